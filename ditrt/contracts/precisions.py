"""The precision registry: every precision ditrt knows, defined once, looked up everywhere.

A :class:`Precision` says what a recipe at that precision stores and what a graph at that
precision may be built into:

- its number formats: the weight format (:data:`FORMATS`: INT8, INT4 or FP8 E4M3) and the activation
  format (None: activations stay in the graph's float type);
- the weight granularity: per output channel, per tensor, or block-wise along the input dimension
  (:data:`INT4_BLOCK_SIZES`, TensorRT's only INT4 blocks);
- the GPUs TensorRT runs it on (``min_compute_capability``);
- whether TensorRT runs it, and if not why;
- the export dtypes (graph float types) TensorRT builds it from;
- the parity tolerance between the exported graph and the torch simulation of its recipe.

Adding a precision is one :func:`register` call below, plus its quantizer (the format's grid,
:mod:`ditrt.contracts.quantizers`) and its Q/DQ emitter in :mod:`ditrt.export.qdq`.
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
    """A number format ``bits`` wide: ``kind`` "int" (signed integers, symmetric in every deployable
    recipe) or "float" (a float8 grid whose largest magnitude is ``max``: E4M3 448, no zero point).
    :mod:`ditrt.contracts.quantizers` rounds onto it; ``qmax`` is what a symmetric scale maps the clip to."""

    name: str
    bits: int
    kind: str = "int"
    max: float | None = None  # float formats: the largest finite magnitude

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def qmax(self) -> float:
        """The largest grid value: ``2^(b-1) - 1`` for integers, ``max`` for floats."""
        return self.max if self.is_float else 2 ** (self.bits - 1) - 1


#: FP8 E4M3 ("fn": finite, no infinities; torch.float8_e4m3fn, ONNX FLOAT8E4M3FN), largest magnitude 448.
FP8_E4M3 = NumberFormat("e4m3", 8, "float", 448.0)
FORMATS = {f.name: f for f in (NumberFormat("int8", 8), NumberFormat("int4", 4), FP8_E4M3)}


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
    weight_granularity: str  # "channel" (per output channel), "tensor" (one scale) or "block" (INT4 blocks along the input dimension)
    tensorrt: bool  # TensorRT runs it
    export_dtypes: tuple[str, ...]  # graph float types TensorRT builds it from (empty when it cannot)
    parity: Tolerance
    summary: str
    why_not_tensorrt: str = ""
    #: The weight rounding calibration uses at this precision unless told otherwise (a WEIGHT_ROUNDINGS
    #: name of ditrt.contracts.recipe), chosen from the quality table (docs/results/quality.md).
    default_weights: str = "rtn"
    #: The lowest CUDA compute capability with tensor-core kernels for it (FP8: Ada 8.9 and Hopper 9.0 onwards).
    min_compute_capability: tuple[int, int] | None = None

    @property
    def weight_fmt(self) -> NumberFormat:
        return FORMATS[self.weight_format]

    @property
    def act_fmt(self) -> NumberFormat | None:
        return None if self.act_format is None else FORMATS[self.act_format]

    @property
    def weight_bits(self) -> int:
        return self.weight_fmt.bits

    @property
    def act_bits(self) -> int | None:
        return None if self.act_format is None else self.act_fmt.bits

    def check_gpu(self, capability: tuple[int, int], source) -> None:
        """Refuse, before TensorRT is touched, a graph of this precision on a GPU of compute ``capability`` without its kernels."""
        need = self.min_compute_capability
        if need is not None and tuple(capability) < tuple(need):
            raise ConfigError(
                f"{source} is {self.name}, which needs a GPU of compute capability {need[0]}.{need[1]} or newer (Ada, Hopper: "
                f"FP8 tensor cores), but this GPU is {capability[0]}.{capability[1]}; build it on such a GPU or re-export at w8a8"
            )

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
register(Precision(
    # Weights per tensor: TensorRT's FP8 GEMM fusion takes one scale per operand (NVIDIA/TensorRT-Model-Connect#1386:
    # "dense-FC fusion only recognizes scalar-both" FP8 scales; per-channel FP8 falls back to dequantize + FP16 GEMM),
    # and Model Optimizer's FP8 ONNX export is per tensor (FP8_DEFAULT_CFG; per-channel FP8 is TensorRT-LLM only,
    # NVIDIA/Model-Optimizer#192). INT8-like parity: a 1-ulp difference upstream flips an FP8 rounding too.
    "fp8", "e4m3", "e4m3", "tensor", tensorrt=True, export_dtypes=("fp32", "fp16"),
    parity=Tolerance(1e-2, 1e-2, "mean"), min_compute_capability=(8, 9),
    summary="FP8 E4M3 weights per tensor, FP8 E4M3 activations per tensor (Ada and Hopper GPUs)",
))  # fmt: skip
#: The tolerance of graphs without quantized activations: they compute what the simulation computes.
EXACT = Tolerance(1e-3, 1e-3)
