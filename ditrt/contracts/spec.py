"""The I/O contract of an exported DiT: what every later stage (ONNX Runtime, TensorRT) asks.

One graph signature for every precision::

    x   (batch, C, H, W) float32   noisy input (latents or pixels)
    t   (batch,)         float32   timesteps of the 1000-step training schedule (fractional allowed)
    y   (batch,)         int64     class labels; ``num_classes`` is the null (unconditional) class
    out (batch, 2C or C, H, W) float32

The boundary stays float32 in float16 graphs too: the sampler hands over float32 tensors, and the
timestep embedding needs float32 (float16 has a spacing of 0.5 at t = 999, so ``sin(t * f)`` would
be wrong). The float16 graph casts ``x`` to float16 right after the input and ``out`` back to
float32 before the output; both casts are negligible next to the transformer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditrt.contracts.errors import InputError
from ditrt.contracts.model_config import DiTConfig

INPUT_NAMES = ("x", "t", "y")
OUTPUT_NAMES = ("out",)
#: Name of the dynamic batch dimension in the ONNX graph (TensorRT profiles set its min/opt/max).
BATCH_DIM = "batch"
#: numpy dtype names of the graph boundary, for every precision.
INPUT_DTYPES = {"x": "float32", "t": "float32", "y": "int64"}
OUTPUT_DTYPES = {"out": "float32"}


@dataclass(frozen=True)
class DiTSpec:
    """Shapes of one DiT's graph inputs and output, and sample inputs to trace or test it with."""

    config: DiTConfig

    @classmethod
    def of(cls, model: torch.nn.Module) -> DiTSpec:
        return cls(model.config)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.input_size, c.input_size)

    def input_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {"x": (batch, *self.image_shape), "t": (batch,), "y": (batch,)}

    def output_shape(self, batch: int) -> tuple[int, ...]:
        c = self.config
        return (batch, c.out_channels, c.input_size, c.input_size)

    def sample_inputs(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Valid inputs: unit-normal ``x``, timesteps spread over [0, 999], labels incl. the null class."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.input_shapes(batch)["x"], generator=g)
        t = torch.rand(batch, generator=g) * 999.0
        y = torch.randint(0, self.config.num_classes + 1, (batch,), generator=g)
        return x, t, y

    def dynamic_shapes(self) -> dict:
        """``torch.export`` dynamic shapes: the batch axis of every input (one shared symbol)."""
        batch = torch.export.Dim(BATCH_DIM, min=1)
        return {name: {0: batch} for name in INPUT_NAMES}

    def check_inputs(self, x, t, y) -> int:
        """The batch size, or :class:`InputError` naming the first input whose shape is wrong."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise InputError(f"x must have shape (batch, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        n = x.shape[0]
        for name, v in (("t", t), ("y", y)):
            if tuple(v.shape) != (n,):
                raise InputError(f"{name} must have shape ({n},) to match x's batch, got {tuple(v.shape)}")
        return n
