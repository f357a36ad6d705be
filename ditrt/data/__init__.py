"""Data that ships with ditrt's dependencies: no downloads."""
