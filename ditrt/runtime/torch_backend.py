"""The PyTorch denoiser: a DiT (float or simulated-quantized) on CPU or CUDA."""

from __future__ import annotations

import torch


class TorchDenoiser:
    """``(x, t, y) -> output`` in float32, running ``model`` in ``dtype`` on ``device``."""

    def __init__(self, model: torch.nn.Module, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x.to(self.device, self.dtype), t.to(self.device), y.to(self.device)).float()
