"""Polygraphy runners for ditrt denoisers, so any backend (torch, simulated recipe, ONNX Runtime,
TensorRT) goes through Polygraphy's ``Comparator`` with the same feeds."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata


class DenoiserRunner(BaseRunner):
    """Wraps a ditrt denoiser ``(x, t, y) -> out``; its output is named ``out`` like the ONNX graph's."""

    def __init__(self, denoiser, *, image_shape: tuple[int, int, int], name: str | None = None, device: str = "cpu"):
        super().__init__(name=name, prefix="ditrt-runner")
        self._denoiser, self.image_shape, self.device = denoiser, image_shape, device

    def activate_impl(self):
        self.denoiser = self._denoiser

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        meta.add("x", np.float32, (-1, *self.image_shape))
        meta.add("t", np.float32, (-1,))
        meta.add("y", np.int64, (-1,))
        return meta

    def infer_impl(self, feed_dict):
        x, t, y = (torch.from_numpy(np.asarray(feed_dict[k])).to(self.device) for k in ("x", "t", "y"))
        start = time.time()
        out = self.denoiser(x, t, y)
        self.inference_time = time.time() - start
        return OrderedDict(out=np.ascontiguousarray(out.detach().float().cpu().numpy()))

    def deactivate_impl(self):
        del self.denoiser
