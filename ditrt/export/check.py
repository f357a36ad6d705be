"""``check_onnx``: what TensorRT's strongly typed, explicit-quantization builder would reject.

Runs ``onnx.checker`` (full check, shape inference included), then the Q/DQ rules of
TensorRT 10.12+/11 (see ``/work/shared/reference/deployment-facts.md``):

=====================  ==========================================================================
rule                   what it asks
=====================  ==========================================================================
onnx-checker           the model is valid ONNX
opset                  the declared opset covers the graph (LayerNorm 17, per-axis Q/DQ 13,
                       float16 scales and FP8 19, Gelu 20, INT4 and ``block_size`` 21)
zero-point             every Q/DQ zero point is 0 (TensorRT quantization is symmetric)
fp8                    FP8 Q/DQ are E4M3FN (TensorRT's only FP8), their zero point is given as a
                       FLOAT8E4M3FN 0 (without one ONNX quantizes to UINT8), a QuantizeLinear
                       saturates (``saturate=1``: TensorRT clips to +-448), activations per tensor
scale-constant         scales and zero points are build-time constants
qdq-dtype              Q input, scale and DQ output share one float type, and a weight DQ's output
                       type is its consumer's activation type
per-channel-axis       a per-channel weight DQ quantizes the consumer's output channels
int4-block             INT4 is block-wise (``block_size`` 64 or 128) on one of the last two dims
int4-weight-only       no INT4 Q/DQ on activations
qdq-nonlinear          no Q/DQ feeding LayerNorm, Softmax or GELU-like ops
qdq-attention          no Q/DQ on the attention MatMuls (both inputs activations)
qdq-placement          an activation Q/DQ feeds only weighted ops (MatMul/Gemm/Conv)
finite                 every floating-point initializer and Constant is finite (no NaN or inf;
                       integer tensors are skipped without being read)
=====================  ==========================================================================
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ditrt.contracts.errors import ArtifactError
from ditrt.contracts.precisions import INT4_BLOCK_SIZES


@dataclass(frozen=True)
class Violation:
    """One broken rule: the node to fix (its name, or ``op#index`` if unnamed), the rule, why."""

    node: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.node or '<model>'}: [{self.rule}] {self.message}"


WEIGHTED_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
NONLINEAR_OPS = {
    "LayerNormalization", "SkipLayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization",
    "Softmax", "LogSoftmax", "Gelu", "FastGelu", "BiasGelu", "Erf", "Tanh",
}  # fmt: skip
#: Ops that move or retype data without computing: followed when looking for a Q/DQ's real consumer.
PASS_THROUGH = {"Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten"}
QDQ = {"QuantizeLinear", "DequantizeLinear"}
#: onnx.TensorProto names of the FP8 types (TensorRT takes only FLOAT8E4M3FN: the fp8 rule).
FP8_TYPES = ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
#: onnx.TensorProto names of the float types that can hold NaN or inf: the tensors the finite rule reads.
FLOAT_TYPES = ("FLOAT", "FLOAT16", "DOUBLE", "BFLOAT16", *FP8_TYPES)


def _fp8_types() -> set[int]:
    from onnx import TensorProto

    return {getattr(TensorProto, t) for t in FP8_TYPES}


def check_onnx(path: str | Path) -> list[Violation]:
    """All violations in the ONNX file at ``path`` (empty if TensorRT should accept its Q/DQ).

    The graph is read without its weights (:func:`ditrt.export.onnx_file.load_lazily`): the checker
    and shape inference see each large tensor as a reference to its bytes, and the rules below read
    a tensor only when they need its values."""

    from ditrt.contracts.files import external_locations
    from ditrt.export.onnx_file import load_lazily

    path = Path(path)
    model, spans = load_lazily(path)
    missing = [name for name in external_locations(model) if not (path.parent / name).is_file()]
    if missing:
        raise ArtifactError(f"the external data file {path.parent / missing[0]} of {path} is missing; re-export the model with `ditrt export`")
    found = []
    try:
        _run_onnx_checker(model, path)
    except Exception as e:  # ValidationError, InferenceError: one line of the first problem
        found.append(Violation("", "onnx-checker", str(e).strip().splitlines()[0][:300]))
    return found + _Checker(model, path, spans).run()


def _run_onnx_checker(model, path: Path) -> None:
    """``onnx.checker.check_model(full_check=True)`` on ``model`` as :func:`load_lazily` read it.

    The checker resolves external data beside the file it is given (beside the working directory for
    a model in memory), so the graph without its weights goes to a temp file beside ``path``, whose
    tensors point into ``path`` itself. Where that folder cannot be written, or ``path`` is a link
    (whose target the checker would refuse as external data), it checks ``path`` itself, loading it whole."""
    import onnx

    if path.is_symlink():
        return onnx.checker.check_model(str(path), full_check=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check.onnx", dir=path.parent)
    except OSError:
        return onnx.checker.check_model(str(path), full_check=True)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        onnx.checker.check_model(tmp, full_check=True)
    finally:
        os.unlink(tmp)


class _Checker:
    def __init__(self, model, path: Path, spans: dict[str, tuple[int, int]]):
        import onnx

        self.model, self.path, self.base_dir, self.spans = model, path, path.parent, spans
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.types = {t.name: t.data_type for t in g.initializer}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
        except Exception:  # an invalid graph: the checker already said so; go on with what is declared
            inferred = g
        for vi in [*inferred.input, *inferred.value_info, *inferred.output]:
            if vi.type.HasField("tensor_type"):
                self.types.setdefault(vi.name, vi.type.tensor_type.elem_type)
        for n in self.nodes:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.types[n.output[0]] = a.t.data_type
        self.found: list[Violation] = []

    # ---------------------------------------------------------------------------- helpers
    def name(self, node) -> str:
        return node.name or f"{node.op_type}#{self.nodes.index(node)}"

    def add(self, node, rule: str, message: str) -> None:
        self.found.append(Violation(self.name(node) if node is not None else "", rule, message))

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, else None (loads external data if needed)."""
        from onnx import external_data_helper, numpy_helper

        from ditrt.export.onnx_file import read_span

        t = self.inits.get(name)
        if t is None:
            p = self.producer.get(name)
            if p is None or p.op_type != "Constant":
                return None
            t = next((a.t for a in p.attribute if a.name == "value"), None)
            if t is None:
                return None
        if t.name in self.spans and name in self.inits:  # left in the graph file by load_lazily
            t = type(t).FromString(t.SerializeToString())
            del t.external_data[:]
            t.data_location = type(t).DEFAULT
            t.raw_data = read_span(self.path, self.spans[t.name])
        elif external_data_helper.uses_external_data(t):
            t = type(t).FromString(t.SerializeToString())
            external_data_helper.load_external_data_for_tensor(t, str(self.base_dir))
        return numpy_helper.to_array(t)

    def is_const(self, name: str) -> bool:
        p = self.producer.get(name)
        return name in self.inits or (p is not None and p.op_type == "Constant")

    def is_weight(self, name: str) -> bool:
        """A constant, possibly behind a DequantizeLinear and data-movement ops."""
        while not self.is_const(name):
            p = self.producer.get(name)
            if p is None or p.op_type not in PASS_THROUGH | {"DequantizeLinear"}:
                return False
            name = p.input[0]
        return True

    def real_consumers(self, name: str):
        """(consumer, input index, ops passed through) of ``name``, looking through Cast/Reshape/..."""
        for c in self.consumers.get(name, []):
            if c.op_type in PASS_THROUGH:
                for cc, idx, via in self.real_consumers(c.output[0]):
                    yield cc, idx, [c, *via]
            else:
                yield c, list(c.input).index(name), []

    @staticmethod
    def attr(node, key: str, default=None):
        from onnx import helper

        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == key), default)

    # ------------------------------------------------------------------------------ rules
    def run(self) -> list[Violation]:
        self.check_opset()
        self.check_finite()
        for n in self.nodes:
            if n.op_type in QDQ:
                self.check_qdq_constants(n)
                self.check_dtypes(n)
                self.check_int4(n)
                self.check_fp8(n)
            if n.op_type == "DequantizeLinear":
                if self.is_const(n.input[0]):
                    self.check_weight_axis(n)
                else:
                    self.check_placement(n)
        return self.found

    def required_opset(self) -> tuple[int, str]:
        from onnx import TensorProto

        need = [(17 if any(n.op_type == "LayerNormalization" for n in self.nodes) else 1, "LayerNormalization")]
        if any(n.op_type == "Gelu" for n in self.nodes):
            need.append((20, "Gelu"))
        for n in self.nodes:
            if n.op_type not in QDQ:
                continue
            scale_t = self.types.get(n.input[1])
            if self.attr(n, "block_size", 0) or self.qtype(n) in (TensorProto.INT4, TensorProto.UINT4):
                need.append((21, "INT4 / block-wise Q/DQ"))
            elif self.qtype(n) in _fp8_types():
                need.append((19, "FP8 Q/DQ"))
            elif scale_t in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
                need.append((19, "float16/bfloat16 Q/DQ scales"))
            elif self.attr(n, "axis") is not None and self.const(n.input[1]) is not None and self.const(n.input[1]).size > 1:
                need.append((13, "per-axis Q/DQ"))
        return max(need)

    def check_opset(self) -> None:
        need, why = self.required_opset()
        if self.opset < need:
            self.add(
                None,
                "opset",
                f"the graph declares opset {self.opset} but {why} needs opset {need}; re-export with opset {max(need, 21)}",
            )

    def qtype(self, n) -> int | None:
        """The integer type of a Q output / DQ input."""
        if n.op_type == "DequantizeLinear":
            return self.types.get(n.input[0])
        if len(n.input) > 2 and n.input[2]:
            return self.types.get(n.input[2])
        return self.attr(n, "output_dtype") or 2  # UINT8 by default

    def check_finite(self) -> None:
        """One violation per floating-point constant holding NaN or inf, on the first node that reads it."""
        from onnx import TensorProto

        floats = {getattr(TensorProto, t) for t in FLOAT_TYPES}
        constants = [(t.name, t.data_type, list(t.dims)) for t in self.model.graph.initializer]
        for n in self.nodes:
            value = next((a.t for a in n.attribute if a.name == "value"), None) if n.op_type == "Constant" else None
            if value is not None:
                constants.append((n.output[0], value.data_type, list(value.dims)))
        for name, dtype, dims in constants:
            if dtype not in floats:
                continue  # integers (quantized weights, zero points) cannot be non-finite: not read at all
            values = self.const(name).astype(np.float32)  # float16/bfloat16/float8 widen exactly
            nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
            if nan or inf:
                reader = next(iter(self.consumers.get(name, [])), None) or self.producer.get(name)
                self.add(reader, "finite", (
                    f"{name} ({TensorProto.DataType.Name(dtype)} {dims}) holds {nan} NaN and {inf} infinite of {values.size} values; "
                    "re-export from weights and a recipe that are finite (a float16 graph overflows beyond 65504: export as fp32)"
                ))  # fmt: skip

    def check_qdq_constants(self, n) -> None:
        for idx, what in ((1, "scale"), (2, "zero point")):
            if len(n.input) <= idx or not n.input[idx]:
                continue
            if not self.is_const(n.input[idx]):
                self.add(
                    n, "scale-constant", f"the {what} {n.input[idx]} is computed at run time; TensorRT needs build-time constants"
                )
            elif idx == 2:
                zp = self.const(n.input[2])
                if zp is not None and np.any(zp.astype(np.float64) != 0):
                    self.add(
                        n,
                        "zero-point",
                        f"zero point {n.input[2]} is not 0 (max |zp| {np.abs(zp.astype(np.float64)).max():g}); TensorRT quantization is symmetric",
                    )

    def check_dtypes(self, n) -> None:
        from onnx import TensorProto

        name_of = TensorProto.DataType.Name
        scale_t = self.types.get(n.input[1])
        if n.op_type == "QuantizeLinear":
            x_t = self.types.get(n.input[0])
            if None not in (x_t, scale_t) and x_t != scale_t:
                self.add(
                    n,
                    "qdq-dtype",
                    f"input is {name_of(x_t)} but the scale is {name_of(scale_t)}; strong typing needs one type (or Casts to float32 around the Q/DQ)",
                )
            return
        src = self.producer.get(n.input[0])
        if src is not None and src.op_type == "QuantizeLinear":
            x_t = self.types.get(src.input[0])
            if None not in (x_t, scale_t) and x_t != scale_t:
                self.add(n, "qdq-dtype", f"dequantizes to {name_of(scale_t)} what {self.name(src)} quantized from {name_of(x_t)}")
        for c, idx, via in self.real_consumers(n.output[0]):
            if c.op_type in WEIGHTED_OPS and idx == 1 and not any(v.op_type == "Cast" for v in via):
                act_t = self.types.get(c.input[0])
                if None not in (act_t, scale_t) and act_t != scale_t:
                    self.add(n, "qdq-dtype", f"dequantizes to {name_of(scale_t)} but {self.name(c)} computes in {name_of(act_t)}")

    def check_int4(self, n) -> None:
        from onnx import TensorProto

        if self.qtype(n) not in (TensorProto.INT4, TensorProto.UINT4):
            return
        if n.op_type == "QuantizeLinear" or not self.is_const(n.input[0]):
            self.add(
                n, "int4-weight-only", "INT4 is weight-only in TensorRT: quantize activations to INT8/FP8 or leave them in float"
            )
            return
        block = self.attr(n, "block_size", 0)
        w = self.inits.get(n.input[0])
        rank = len(w.dims) if w is not None else 2
        axis = self.attr(n, "axis", 1)
        axis = axis + rank if axis < 0 else axis
        if block not in INT4_BLOCK_SIZES:
            self.add(
                n, "int4-block", f"INT4 weights need block-wise DequantizeLinear with block_size 64 or 128, got {block or 'none'}"
            )
        elif axis < rank - 2:
            self.add(
                n, "int4-block", f"INT4 blocks must run along one of the last two dims, got axis {axis} of a rank-{rank} weight"
            )

    def check_fp8(self, n) -> None:
        from onnx import TensorProto

        qt = self.qtype(n)
        zp_t = self.types.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if qt not in _fp8_types() and zp_t not in _fp8_types():
            return
        if TensorProto.FLOAT8E4M3FN not in (qt, zp_t) or (zp_t is not None and zp_t != TensorProto.FLOAT8E4M3FN):
            got = TensorProto.DataType.Name(zp_t if zp_t in _fp8_types() else qt)
            self.add(n, "fp8", f"{got} is not TensorRT's FP8: quantize to FLOAT8E4M3FN")
        if n.op_type == "QuantizeLinear" and zp_t is None:
            self.add(n, "fp8", "an FP8 QuantizeLinear needs a FLOAT8E4M3FN zero point of 0 (without one ONNX quantizes to UINT8)")
        if n.op_type == "QuantizeLinear" and self.attr(n, "saturate", 1) != 1:
            self.add(n, "fp8", "saturate=0 turns values beyond +-448 into NaN; TensorRT clips them: set saturate=1")
        activation = n.op_type == "QuantizeLinear" or not self.is_const(n.input[0])
        scale = self.const(n.input[1])
        if activation and scale is not None and scale.size != 1:
            self.add(n, "fp8", f"FP8 activations are quantized per tensor in TensorRT, got {scale.size} scales")

    def check_weight_axis(self, n) -> None:
        scale = self.const(n.input[1])
        if scale is None or scale.ndim != 1 or self.attr(n, "block_size", 0):
            return  # per-tensor, or block-wise (checked by int4-block)
        w = self.inits.get(n.input[0])
        rank = len(w.dims) if w is not None else 2
        axis = self.attr(n, "axis", 1)
        axis = axis + rank if axis < 0 else axis
        if w is not None and scale.size != w.dims[axis]:
            self.add(n, "per-channel-axis", f"{scale.size} scales for axis {axis} of a weight shaped {list(w.dims)}")
        for c, idx, via in self.real_consumers(n.output[0]):
            want = self.output_channel_axis(c, idx, via, rank)
            if want is not None and axis != want:
                self.add(
                    n,
                    "per-channel-axis",
                    f"axis {axis} is not the output-channel axis {want} of the weight as {self.name(c)} uses it; use axis {want}",
                )

    def output_channel_axis(self, c, idx: int, via, rank: int) -> int | None:
        if idx != 1 or c.op_type not in WEIGHTED_OPS:
            return None
        if c.op_type in ("Conv", "ConvTranspose"):
            return 0 if c.op_type == "Conv" else 1
        if c.op_type == "Gemm":
            axis = 0 if self.attr(c, "transB", 0) else 1
        else:
            axis = rank - 1  # MatMul B is (..., K, N)
        for v in via:
            if v.op_type == "Transpose":
                perm = list(self.attr(v, "perm", list(range(rank))[::-1]))
                axis = perm[axis]
            elif v.op_type != "Cast":
                return None  # reshaped: cannot tell
        return axis

    def check_placement(self, n) -> None:
        for c, idx, via in self.real_consumers(n.output[0]):
            where = f"{self.name(c)} ({c.op_type})" + (f" through {', '.join(v.op_type for v in via)}" if via else "")
            if c.op_type in NONLINEAR_OPS:
                self.add(n, "qdq-nonlinear", f"quantized activation feeds {where}; keep LayerNorm, Softmax and GELU in float")
            elif c.op_type == "MatMul" and not any(self.is_weight(i) for i in c.input):
                self.add(
                    n,
                    "qdq-attention",
                    f"quantized activation feeds {where}, an activation x activation MatMul (attention BMM); keep it in float",
                )
            elif c.op_type not in WEIGHTED_OPS:
                self.add(
                    n,
                    "qdq-placement",
                    f"quantized activation feeds {where}; quantize only the inputs of weighted ops (MatMul/Gemm/Conv)",
                )
