"""A tiny random stand-in for NVIDIA's ``inception-2015-12-05.pt`` (no real Inception file exists here).

Same TorchScript call as the real network: ``net(img, return_features=False, use_fp16=False,
no_output_bias=False)`` with ``img`` an (N, 3, H, W) tensor of uint8 values of any size (resized
inside, mapped to (x - 128) / 128); ``return_features=True`` -> (N, 2048) features, otherwise
(N, 1008) softmax probabilities, without the output bias when ``no_output_bias``. Only the first
``width`` features vary (the rest are 0, like dead units), which keeps exact FIDs cheap to check.
Also the ADM evaluator's precision/recall rule written out brute force, as the tests' oracle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FEATURES, CLASSES = 2048, 1008


class StandInInception(nn.Module):
    def __init__(self, width: int = 8, seed: int = 0, uniform: bool = False, features: int = FEATURES):
        super().__init__()
        torch.manual_seed(seed)
        self.pad = features - width
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.output = nn.Linear(features, CLASSES)
        with torch.no_grad():
            self.output.weight.normal_(0, 3.0)
            self.output.bias.normal_(0, 30.0)  # large: a caller that keeps the bias gets other probabilities
            if uniform:
                self.output.weight.zero_()

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        x = F.interpolate(img.to(torch.float32), size=(12, 12), mode="bilinear", align_corners=False)
        x = (x - 128.0) / 128.0
        f = torch.relu(self.conv(x)).mean(dim=(2, 3))
        f = torch.cat([f, torch.zeros(f.shape[0], self.pad, dtype=f.dtype, device=f.device)], 1)
        if return_features:
            return f
        if no_output_bias:
            logits = F.linear(f, self.output.weight)
        else:
            logits = self.output(f)
        return torch.softmax(logits, 1)


def save_standin(path: Path, **kwargs) -> Path:
    torch.jit.save(torch.jit.script(StandInInception(**kwargs).eval()), str(path))
    return Path(path)


def standin_outputs(path: Path, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stand-in's (features, no-bias probabilities) for (N, 3, H, W) uint8 pixels, called directly."""
    net = torch.jit.load(str(path))
    x = torch.from_numpy(np.ascontiguousarray(pixels))
    with torch.no_grad():
        return net(x, return_features=True).numpy(), net(x, no_output_bias=True).numpy()


def adm_precision_recall(ref: np.ndarray, smp: np.ndarray, k: int = 3) -> tuple[float, float]:
    """The ADM ManifoldEstimator rule, brute force in float64: radii are the (k+1)-th smallest squared
    distance within a set (itself included), a point is covered when its distance is <= a radius."""
    d = lambda u, v: np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None], 0)  # noqa: E731
    ref, smp = np.asarray(ref, np.float64), np.asarray(smp, np.float64)
    r_ref, r_smp = np.partition(d(ref, ref), k, axis=1)[:, k], np.partition(d(smp, smp), k, axis=1)[:, k]
    cross = d(ref, smp)
    return float((cross <= r_ref[:, None]).any(0).mean()), float((cross <= r_smp[None]).any(1).mean())
