"""Accuracy comparison through Polygraphy: real DiT inputs, any backend as a Polygraphy runner,
per-output statistics and per-layer bisection at the ONNX level."""
