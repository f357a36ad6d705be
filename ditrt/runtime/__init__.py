"""Sampling around any backend: the denoisers (torch, ONNX Runtime, TensorRT) and sample sets."""
