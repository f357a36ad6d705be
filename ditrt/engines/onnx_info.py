"""What the engine stage needs to know about an ONNX file, read with the ``onnx`` package only:
input shapes, ``ditrt.*`` metadata, the precision, and a content hash that covers external data.

Only the graph is parsed (``load_external_data=False``), so a DiT-XL/2 with external weights
is summarised without loading its weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ditrt.contracts.files import external_locations, load_onnx_graph

#: metadata_props keys that may name the precision, most specific first (ditrt export writes the first).
PRECISION_KEYS = ("ditrt.precision", "ditrt.recipe.precision", "precision")


@dataclass(frozen=True)
class OnnxSummary:
    """Inputs as ``name -> shape`` (ints, or str/None for dynamic axes), ``ditrt.*`` metadata, and
    the precision: from metadata when recorded (``precision_source="metadata"``), else inferred
    from the graph's Q/DQ nodes and initializer dtypes (``"inferred"``)."""

    inputs: dict[str, tuple]
    input_dtypes: dict[str, str]
    outputs: dict[str, tuple]
    metadata: dict[str, str] = field(default_factory=dict)
    precision: str | None = None
    precision_source: str | None = None
    external_data: tuple[str, ...] = ()


def _dims(value_info) -> tuple:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return ()
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)


def infer_precision(model) -> str:
    """The precision a graph deploys at, from its nodes and initializers.

    INT4 weights -> ``w4a16`` (``w4a8`` if activations are quantized too), INT8 Q/DQ -> ``w8a8``,
    FP8 -> ``fp8``, otherwise the float type of the weights (``fp16``, ``bf16``, ``fp32``)."""
    from onnx import TensorProto

    init_types = {t.data_type for t in model.graph.initializer}
    ops = {n.op_type for n in model.graph.node}
    int4 = bool(init_types & {TensorProto.INT4, TensorProto.UINT4})
    quantizes = "QuantizeLinear" in ops
    if int4:
        return "w4a8" if quantizes else "w4a16"
    if init_types & {TensorProto.INT8, TensorProto.UINT8} and "DequantizeLinear" in ops:
        return "w8a8"
    if init_types & {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2}:
        return "fp8"
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
    )
