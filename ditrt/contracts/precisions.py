"""The precision registry: every precision ditrt knows, defined once, looked up everywhere.

A :class:`Precision` says what a recipe at that precision stores and what a graph at that
precision may be built into:

- its number formats: the weight format (:data:`FORMATS`, e.g. INT8 or INT4) and the activation
  format (None: activations stay in the graph's float type);
- the weight granularity: per output channel, or block-wise along the input dimension
  (:data:`INT4_BLOCK_SIZES`, TensorRT's only INT4 blocks);
- whether TensorRT runs it, and if not why;
- the export dtypes (graph float types) TensorRT builds it from;
- the parity tolerance between the exported graph and the torch simulation of its recipe.

Adding a precision is one :func:`register` call below, plus its quantizer (the format's integer
grid, :mod:`ditrt.contracts.quantizers`) and its Q/DQ emitter in :mod:`ditrt.export.qdq`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ditrt.contracts.errors import ConfigError

#: INT4 block sizes TensorRT's block-wise DequantizeLinear accepts (along the input dimension).
INT4_BLOCK_SIZES = (64, 128)
#: Float types an exported graph computes in (the graph boundary stays float32 for all of them).
EXPORT_DTYPES = ("fp32", "fp16")


@dataclass(frozen=True)
class NumberFormat:
    """An integer number format: ``bits`` wide, signed, symmetric in every deployable recipe."""

    name: str
    bits: int


FORMATS = {f.name: f for f in (NumberFormat("int8", 8), NumberFormat("int4", 4))}


@dataclass(frozen=True)
class Tolerance:
    """Polygraphy's check of a graph against the simulation: ``error_stat`` "elemwise" compares every
    element with ``atol``/``rtol``; "mean" compares the mean error (for INT8 activation rounding,
    where a 1-ulp upstream difference flips an int8 value and flips cascade through the blocks)."""

    atol: float
    rtol: float
    error_stat: str = "elemwise"


@dataclass(frozen=True)
class Precision:
    name: str
    weight_format: str
    act_format: str | None
    weight_granularity: str  # "channel" (per output channel) or "block" (INT4 blocks along the input dimension)
    tensorrt: bool  # TensorRT runs it
    export_dtypes: tuple[str, ...]  # graph float types TensorRT builds it from (empty when it cannot)
    parity: Tolerance
    summary: str
    why_not_tensorrt: str = ""
    #: The weight rounding calibration uses at this precision unless told otherwise (a WEIGHT_ROUNDINGS
    #: name of ditrt.contracts.recipe), chosen from the quality table (docs/results/quality.md).
    default_weights: str = "rtn"

    @property
    def weight_bits(self) -> int:
        return FORMATS[self.weight_format].bits

    @property
    def act_bits(self) -> int | None:
        return None if self.act_format is None else FORMATS[self.act_format].bits

    @property
    def quantizes_activations(self) -> bool:
        return self.act_format is not None

    def check_buildable(self, dtype: str, source) -> None:
        """Refuse, before TensorRT is touched, a graph of this precision in ``dtype`` that TensorRT has no kernels for."""
        if not self.tensorrt:
            raise ConfigError(f"{source} is {self.name}: {self.why_not_tensorrt}")
        if dtype not in self.export_dtypes:
            raise ConfigError(
                f"{source} is {self.name} with {dtype} activations, but TensorRT runs {self.name} from "
                f"{' or '.join(self.export_dtypes)} graphs only: re-export with `ditrt export --dtype {self.export_dtypes[0]}`"
            )


PRECISIONS: dict[str, Precision] = {}


def register(precision: Precision) -> Precision:
    if precision.weight_format not in FORMATS or (precision.act_format is not None and precision.act_format not in FORMATS):
        raise ValueError(f"{precision.name}: unknown number format")
    PRECISIONS[precision.name] = precision
    return precision


def get_precision(name: str) -> Precision:
    """The registered precision ``name``, or :class:`ConfigError` listing the known ones."""
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}; choose one of: {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


register(Precision(
    "w8a8", "int8", "int8", "channel", tensorrt=True, export_dtypes=("fp32", "fp16"),
    parity=Tolerance(1e-2, 1e-2, "mean"),
    summary="INT8 weights per output channel, INT8 activations per tensor",
))  # fmt: skip
register(Precision(
    "w4a16", "int4", None, "block", tensorrt=True, export_dtypes=("fp16",),
    parity=Tolerance(1e-3, 1e-3),
    summary="INT4 weights block-wise (64 or 128 along the input dimension), float activations",
    why_not_tensorrt="", default_weights="gptq",  # 50 steps, N = 64: one-step SQNR 44.6 dB pooled vs 31.5 round to nearest
))  # fmt: skip
register(Precision(
    "w4a8", "int4", "int8", "channel", tensorrt=False, export_dtypes=(),
    parity=Tolerance(1e-2, 1e-2, "mean"),
    summary="INT4 weights, INT8 activations (the papers' setting; simulation only)", default_weights="gptq",
    why_not_tensorrt="INT4 weights with INT8 activations is no TensorRT format; use w8a8 or w4a16 for deployment",
))  # fmt: skip
#: The tolerance of graphs without quantized activations: they compute what the simulation computes.
EXACT = Tolerance(1e-3, 1e-3)
