"""What the engine stage needs to know about an ONNX file, read with the ``onnx`` package only:
input shapes, ``ditrt.*`` metadata, the precision, and a content hash that covers external data.

Only the graph is parsed (``load_external_data=False``), so a DiT-XL/2 with external weights
is summarised without loading its weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ditrt.contracts.files import external_locations, load_onnx_graph
from ditrt.contracts.precisions import FORMATS, PRECISIONS

#: metadata_props keys that may name the precision, most specific first (ditrt export writes the first).
PRECISION_KEYS = ("ditrt.precision", "ditrt.recipe.precision", "precision")


@dataclass(frozen=True)
class OnnxSummary:
    """Inputs as ``name -> shape`` (ints, or str/None for dynamic axes), ``ditrt.*`` metadata, and
    the precision: from metadata when recorded (``precision_source="metadata"``), else inferred
    from the graph's Q/DQ nodes and initializer dtypes (``"inferred"``); likewise ``dtype``."""

    inputs: dict[str, tuple]
    input_dtypes: dict[str, str]
    outputs: dict[str, tuple]
    metadata: dict[str, str] = field(default_factory=dict)
    precision: str | None = None
    precision_source: str | None = None
    external_data: tuple[str, ...] = ()
    dtype: str | None = None  # the float type it computes in ("fp32", "fp16", "bf16"): ``ditrt.dtype``, else inferred


def _dims(value_info) -> tuple:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return ()
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)


def infer_precision(model) -> str:
    """The precision a graph deploys at, from its nodes and initializers, as a registry name.

    The integer weight format (INT4 or INT8 initializers behind a DequantizeLinear) and the
    activation format (the integer type a QuantizeLinear produces, none without one) name the
    registered precision with those formats (:data:`ditrt.contracts.precisions.PRECISIONS`: INT4
    weights -> ``w4a16``, ``w4a8`` with INT8 activations; INT8 with INT8 activations -> ``w8a8``),
    else ``w<bits>a<bits>`` (``a16``: float activations). Without integer weights: ``fp8`` for FP8
    initializers, otherwise the graph's float type (:func:`infer_dtype`)."""
    from onnx import TensorProto

    init_types = {t.data_type for t in model.graph.initializer}
    ops = {n.op_type for n in model.graph.node}
    weight = next((f for f, types in _INT_FORMATS.items() if init_types & {getattr(TensorProto, t) for t in types}), None)
    if weight is not None and "DequantizeLinear" in ops:
        return _precision_named(weight, _activation_format(model))
    if init_types & {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2}:
        return "fp8"
    return infer_dtype(model)


#: Registry number formats (:data:`ditrt.contracts.precisions.FORMATS`) -> their ONNX element types, widest last.
_INT_FORMATS = {"int4": ("INT4", "UINT4"), "int8": ("INT8", "UINT8")}


def _activation_format(model) -> str | None:
    """The number format of the graph's activation QuantizeLinear outputs (their zero point's type), None without any."""
    from onnx import TensorProto

    types = {t.name: t.data_type for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            zp_type = types.get(n.input[2]) if len(n.input) > 2 and n.input[2] else TensorProto.UINT8  # ONNX's default
            name = TensorProto.DataType.Name(zp_type) if zp_type is not None else "INT8"
            return next((f for f, names in _INT_FORMATS.items() if name in names), name.lower())
    return None


def _precision_named(weight_format: str, act_format: str | None) -> str:
    match = next((p.name for p in PRECISIONS.values() if (p.weight_format, p.act_format) == (weight_format, act_format)), None)
    if match is not None:
        return match
    bits = lambda f: FORMATS[f].bits if f in FORMATS else f  # noqa: E731
    return f"w{bits(weight_format)}a{16 if act_format is None else bits(act_format)}"


def infer_dtype(model) -> str:
    """The float type a graph computes in, from its initializers: ``fp16``, ``bf16``, else ``fp32``."""
    from onnx import TensorProto

    init_types = {t.data_type for t in model.graph.initializer}
    if TensorProto.FLOAT16 in init_types:
        return "fp16"
    if TensorProto.BFLOAT16 in init_types:
        return "bf16"
    return "fp32"


def read_onnx(path: Path) -> OnnxSummary:
    """Summarise the ONNX file at ``path`` (graph only; raises :class:`ArtifactError` if unreadable)."""
    from onnx import TensorProto

    model = load_onnx_graph(path)
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]  # old exporters list weights as inputs
    metadata = {p.key: p.value for p in model.metadata_props}
    precision = next((metadata[k] for k in PRECISION_KEYS if metadata.get(k)), None)
    source = "metadata" if precision else "inferred"
    return OnnxSummary(
        inputs={i.name: _dims(i) for i in graph_inputs},
        input_dtypes={i.name: TensorProto.DataType.Name(i.type.tensor_type.elem_type) for i in graph_inputs},
        outputs={o.name: _dims(o) for o in model.graph.output},
        metadata={k: v for k, v in metadata.items() if k.startswith("ditrt.")},
        precision=precision or infer_precision(model),
        precision_source=source,
        external_data=external_locations(model),
        dtype=metadata.get("ditrt.dtype") or infer_dtype(model),
    )
