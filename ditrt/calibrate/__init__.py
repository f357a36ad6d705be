"""Post-training quantization of DiTs: calibration data, quantizers, balancing (PTQ4DiT CSB + SSC,
SmoothQuant), simulation, and the recipe artifact."""
