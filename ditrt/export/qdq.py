"""Q/DQ insertion into an exported float DiT graph, from a recipe (see :mod:`ditrt.contracts.recipe`).

For each quantized Linear ``L`` (found by the module path the dynamo exporter records on its
MatMul or Gemm node, and verified against the folded weight), the weight becomes an integer
initializer ``L.weight_quantized`` stored pre-transposed as ``[in, out]`` feeding the MatMul through a
DequantizeLinear:

- w8a8: int8 weight, DQ per output channel (``axis=1`` of ``[in, out]``), and a per-tensor symmetric
  ``QuantizeLinear -> DequantizeLinear`` (int8, zero point 0) on the MatMul's activation input;
- w4a16: INT4 weight (two per byte), DQ block-wise along the input dimension (``axis=0``,
  ``block_size`` 64 or 128, opset 21), activations left in float;
- fp8: FLOAT8E4M3FN weight initializer with one scale (per-tensor DQ), and a per-tensor
  ``QuantizeLinear (saturate=1) -> DequantizeLinear`` with a FLOAT8E4M3FN zero point of 0 on the
  activation input (opset 19). Pre-quantized FP8 weights behind a DQ are what TensorRT takes ("when
  using pre-quantized weights, an IDequantizeLayer is required between the weights and the linear
  operator", TensorRT's Explicit Quantization guide) and what Model Optimizer's FP8 ONNX export writes
  (its ``compress_weights``: FP8 initializers + DQ, pre-transposed for the MatMul; Q/DQ kept on activations).

Why ``[in, out]``: TensorRT accepts both ``DQ(W[out,in], axis 0) -> Transpose`` and the pre-transposed
form, but ONNX Runtime fuses only ``DQ -> MatMul`` (to ``MatMulIntegerToFloat`` / ``MatMulNBits``), so
the reference executor runs real int8/int4 kernels. No output Q; scales have the graph's float type
(strong typing: Q input, scale and DQ output share one dtype).

A layer the recipe smooths at run time (``runtime_smoothed``: fc2, whose input is the GELU output)
gets one pointwise ``Mul`` by the constant ``1 / d`` (``L.input_multiplier``, (in,), the graph's float
type) on its input, before its QuantizeLinear (or its MatMul in a weight-only graph); its folded
weight already holds ``W * d``. Nothing is folded into the GELU. TensorRT fuses such a pointwise op
with the GELU before it and the quantize after it; ONNX Runtime runs it as its own kernel.
"""

from __future__ import annotations

import ast
import logging

import ml_dtypes
import numpy as np
import torch
from torch import nn

from ditrt.contracts.errors import ArtifactError, ConfigError
from ditrt.contracts.precisions import FORMATS, INT4_BLOCK_SIZES
from ditrt.contracts.quantizers import expand_weight_scale, quantize
from ditrt.contracts.recipe import Recipe, check_recipe_matches
from ditrt.models.quantized import folded_float_model, input_reciprocal, runtime_divisors

log = logging.getLogger(__name__)

_NP = {"fp32": np.float32, "fp16": np.float16}
#: The numpy type of each registry number format (:data:`ditrt.contracts.precisions.FORMATS`), which onnx_ir
#: writes as its ONNX element type (INT8, INT4, FLOAT8E4M3FN).
_NP_FORMAT = {"int8": np.int8, "int4": ml_dtypes.int4, "e4m3": ml_dtypes.float8_e4m3fn}
#: Lowest opset whose QuantizeLinear/DequantizeLinear take FP8 (and its ``saturate`` attribute).
FP8_OPSET = 19


# ------------------------------------------------------------------------------------- validation
def check_exportable(
    recipe: Recipe, tensors: dict, *, dtype: str, opset: int, model_hash: str | None = None, timestep_group: int | None = None
) -> None:
    """Refuse, with one line each, recipes that TensorRT cannot run or this exporter cannot write."""
    if not recipe.symmetric:
        raise ConfigError(
            f"recipe {recipe.method}/{recipe.precision} is asymmetric and cannot be exported: TensorRT needs zero points of 0; "
            "re-run `ditrt calibrate` with symmetric quantization (asymmetric recipes are for simulation only)"
        )
    spec = recipe.spec  # the precision registry decides; nothing below names a precision
    if not spec.tensorrt:
        raise ConfigError(f"recipe precision {spec.name} cannot be exported: {spec.why_not_tensorrt} ({spec.name} is for simulation only)")
    if recipe.dynamic_activations:
        raise ConfigError(
            "recipe uses dynamic per-sample activation scales, which have no Q/DQ form (TensorRT's scales are constants); "
            "re-run `ditrt calibrate` without --dynamic-activations (use --timestep-groups for time-varying scales)"
        )
    if spec.weight_format == "int4" or spec.weight_granularity == "block":
        if opset < 21:
            raise ConfigError(f"{spec.name} needs opset 21 (INT4 and block-wise DequantizeLinear), got opset {opset}")
    if spec.weight_fmt.is_float and opset < FP8_OPSET:
        raise ConfigError(f"{spec.name} needs opset {FP8_OPSET} (FP8 QuantizeLinear/DequantizeLinear), got opset {opset}")
    if spec.weight_granularity == "block":
        blocks = {recipe.block_size} | set(recipe.layer_block_sizes.values())
        bad = sorted(b for b in blocks if b not in INT4_BLOCK_SIZES)
        if bad:
            raise ConfigError(
                f"INT4 block size {bad[0] or 'per-channel'} is not one TensorRT supports ({' or '.join(map(str, INT4_BLOCK_SIZES))}); "
                "re-run `ditrt calibrate` with --block-size 64 (or qdit with the default candidates)"
            )
    k = recipe.timestep_groups
    if k > 1 and spec.quantizes_activations and (timestep_group is None or not 0 <= timestep_group < k):
        raise ConfigError(
            f"this recipe has {k} timestep groups of activation scales: export one graph per group "
            f"(timestep_group 0..{k - 1}; `ditrt export` writes all of them), got {timestep_group}"
        )
    if dtype == "fp16" and opset < 19:
        raise ConfigError(f"float16 Q/DQ scales need opset 19 or newer, got opset {opset}")
    if model_hash is not None:
        check_recipe_matches(recipe, model_hash, "the model being exported")
    for name in recipe.layers:
        p = f"quant.{name}."
        needed = [p + "weight_scale"] + ([p + "input_scale"] if spec.quantizes_activations else [])
        missing = [k for k in needed if k not in tensors]
        if missing:
            raise ArtifactError(f"recipe tensors lack {missing[0]}; the recipe folder is incomplete, re-run `ditrt calibrate`")
    for name, d in runtime_divisors(tensors, recipe).items():
        _graph_multiplier(d, dtype, name)  # refused before the export's expensive work


def folded_model(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with the recipe's folded float weights (``model.*``), if it has any, and its
    run-time input divisors (:func:`ditrt.models.quantized.folded_float_model`): the float model a
    quantized graph is the Q/DQ version of."""
    return folded_float_model(model, tensors)


def layer_weights(model: nn.Module, recipe: Recipe, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer -> its float32 weight (out, in) as the recipe folded it (``model.<layer>.weight``), or
    the model's own when the recipe carries no folded weights."""
    weights = {}
    for name in recipe.layers:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            raise ArtifactError(f"recipe layer {name} is not a Linear in this model; re-run `ditrt calibrate` for it")
        w = tensors.get(f"model.{name}.weight", lin.weight)
        if tuple(w.shape) != (lin.out_features, lin.in_features):
            raise ArtifactError(f"recipe weight of {name} has shape {tuple(w.shape)}, not the model's; re-run `ditrt calibrate`")
        weights[name] = w.detach().float().cpu()
    return weights


# --------------------------------------------------------------------------------- finding layers
def module_path(node) -> str | None:
    """The module path the exporter recorded for ``node`` (e.g. ``blocks.0.attn.qkv``), if any."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    try:
        names = ast.literal_eval(scopes)  # ['', 'blocks', 'blocks.0', ..., 'blocks.0.attn.qkv', 'linear']
    except (ValueError, SyntaxError):
        return None
    return names[-2] if len(names) >= 2 else None


def weight_initializer(node):
    """(initializer, transposed) that ``node`` multiplies by as its second input, directly or through a
    2-D ``Transpose`` (the exporter folds that Transpose into the initializer; unfolded is handled too)."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    w = node.inputs[1]
    if w.const_value is not None:
        return w, False
    p = w.producer()
    src = p.inputs[0] if p is not None and p.op_type == "Transpose" else None
    if src is not None and src.const_value is not None and len(src.shape) == 2:
        return src, True  # a 2-D transpose can only swap the two axes
    return None


def linear_nodes(graph) -> dict[str, object]:
    """Module path -> the MatMul/Gemm that multiplies by that Linear's weight initializer."""
    found = {}
    for node in graph:
        path = module_path(node) if weight_initializer(node) is not None else None
        if path is not None:
            found.setdefault(path, node)
    return found


def name_linear_nodes(graph) -> None:
    """Name each Linear's MatMul/Gemm ``<module path>/MatMul`` (and its bias Add ``.../Add``)."""
    for path, node in linear_nodes(graph).items():
        node.name = f"{path}/{node.op_type}"
        consumers = [u.node for u in node.outputs[0].uses()]
        if node.op_type == "MatMul" and len(consumers) == 1 and consumers[0].op_type == "Add":
            consumers[0].name = f"{path}/Add"


# -------------------------------------------------------------------------------------- insertion
def _const(graph, name: str, array: np.ndarray):
    import onnx_ir as ir

    t = ir.tensor(array, name=name)
    v = ir.Value(name=name, const_value=t, shape=ir.Shape(t.shape), type=ir.TensorType(t.dtype))
    graph.register_initializer(v)
    return v


def _graph_scale(scale: torch.Tensor, dtype: str, what: str) -> np.ndarray:
    s = scale.detach().float().cpu().numpy().astype(_NP[dtype])
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ConfigError(f"{what} has scales that are zero or not finite in {dtype} (float16 keeps 6e-8..65504); export as fp32")
    return s


def _graph_multiplier(divisor: torch.Tensor, dtype: str, layer: str) -> np.ndarray:
    """The constant ``1 / d`` (in,) of a run-time smoothed layer in the graph's float type: the same
    float32 reciprocal the simulation multiplies by (:func:`ditrt.models.quantized.input_reciprocal`)."""
    r = input_reciprocal(divisor).cpu().numpy()
    if r.ndim != 1 or not (np.isfinite(r).all() and (r > 0).all()):
        raise ArtifactError(f"quant.{layer}.input_divisor must be finite positive factors (in,); re-run `ditrt calibrate`")
    with np.errstate(over="ignore"):  # an overflow to inf is refused below
        out = r.astype(_NP[dtype])
    if not (np.isfinite(out).all() and (out > 0).all()):
        raise ConfigError(f"{layer}'s run-time smoothing factors 1/d (range {r.min():.3g}..{r.max():.3g}) do not fit float16; export as fp32")
    return out


def _smooth_input(graph, matmul, layer: str, divisor: torch.Tensor, in_features: int, dtype: str):
    """A ``Mul`` by the constant ``1 / d`` on ``matmul``'s activation input; returns the Mul (not yet inserted)."""
    import onnx_ir as ir

    if tuple(divisor.shape) != (in_features,):
        raise ArtifactError(f"quant.{layer}.input_divisor has shape {tuple(divisor.shape)}, expected ({in_features},); re-run `ditrt calibrate`")
    r = _const(graph, f"{layer}.input_multiplier", _graph_multiplier(divisor, dtype, layer))
    mul = ir.node("Mul", [matmul.inputs[0], r], name=f"{layer}/input_smooth")
    mul.outputs[0].name = f"{layer}.input_smoothed"
    return mul


def quantized_weight(weight: torch.Tensor, scale: torch.Tensor, fmt: str) -> np.ndarray:
    """Grid values of a Linear weight (out, in) in number format ``fmt`` ("int8", "int4", "e4m3"), stored
    transposed as (in, out): int8, ml_dtypes.int4 (ONNX packs INT4 two per byte) or ml_dtypes.float8_e4m3fn
    (each value already on the E4M3 grid, so the conversion is exact)."""
    f = FORMATS[fmt]
    q = quantize(weight.detach().float(), expand_weight_scale(scale.float(), weight.shape), None, f)
    q = q if f.is_float else q.to(torch.int8)
    return q.t().contiguous().numpy().astype(_NP_FORMAT[fmt], copy=False)


def _multiplies_by(node, weight: torch.Tensor, dtype: str) -> bool:
    """True if ``node`` multiplies by exactly ``weight`` (out, in), in whatever layout it holds it."""
    init, transposed = weight_initializer(node)
    b = init.const_value.numpy()
    if transposed:
        b = b.T
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1:
        b = b.T
    expected = weight.numpy().astype(_NP[dtype]).T  # (in, out), as MatMul's B
    return b.shape == expected.shape and np.array_equal(b, expected)


def find_linears(graph, weights: dict[str, torch.Tensor], dtype: str) -> dict[str, object]:
    """Layer -> its MatMul/Gemm: by the module path the exporter recorded, else (metadata missing,
    another exporter) by its weight's value. Either way the weight is verified bit for bit."""
    by_path = linear_nodes(graph)
    found, unclaimed = {}, [n for n in graph if weight_initializer(n) is not None and n not in by_path.values()]
    for name, w in weights.items():
        node = by_path.get(name)
        if node is None:
            node = next((n for n in unclaimed if _multiplies_by(n, w, dtype)), None)
            if node is None:
                raise ArtifactError(
                    f"recipe layer {name} has no MatMul in the exported graph; the recipe was made for another architecture, "
                    "re-run `ditrt calibrate` for this model"
                )
            unclaimed.remove(node)
        elif not _multiplies_by(node, w, dtype):
            raise ArtifactError(f"the graph's weight for {name} ({node.name}) is not the recipe's; cannot insert Q/DQ")
        found[name] = node
    return found


def _drop_if_unused(graph, value) -> None:
    """Remove a float weight (and the Transpose in front of it) once nothing reads it."""
    if value is None or value.uses() or value.is_graph_output():
        return
    producer = value.producer()
    if producer is not None:
        inputs = list(producer.inputs)  # removal detaches them
        graph.remove(producer, safe=True)
        for v in inputs:
            _drop_if_unused(graph, v)
    elif value.name in graph.initializers:
        graph.initializers.pop(value.name)


def _matmul_of(graph, node, layer: str):
    """The MatMul to quantize: ``node`` itself, or a MatMul + Add replacing a 2-D Gemm (adaLN, t-MLP)."""
    import onnx_ir as ir

    if node.op_type == "MatMul":
        return node
    a = node.attributes
    if a.get_int("transA", 0) or a.get_float("alpha", 1.0) != 1.0 or a.get_float("beta", 1.0) != 1.0:
        raise ArtifactError(f"{layer} was exported as a Gemm with transA/alpha/beta; cannot insert Q/DQ")
    matmul = ir.node("MatMul", [node.inputs[0], node.inputs[1]], name=f"{layer}/MatMul", metadata_props=dict(node.metadata_props))
    matmul.outputs[0].name = f"{layer}.matmul"
    new = [matmul]
    out = matmul.outputs[0]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        add = ir.node("Add", [out, node.inputs[2]], name=f"{layer}/Add", metadata_props=dict(node.metadata_props))
        new.append(add)
        out = add.outputs[0]
    graph.insert_before(node, new)
    name = node.outputs[0].name
    node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name = name
    return matmul


def _insert_layer(graph, node, layer: str, weight: torch.Tensor, recipe: Recipe, tensors: dict, dtype: str, group: int) -> None:
    import onnx_ir as ir

    old_weight = node.inputs[1]  # the float weight (or the Transpose of it): dropped below
    matmul = _matmul_of(graph, node, layer)
    matmul.name = f"{layer}/MatMul"
    p = f"quant.{layer}."
    wscale, spec = tensors[p + "weight_scale"], recipe.spec
    out_f, in_f = weight.shape
    blockwise, per_tensor = spec.weight_granularity == "block", spec.weight_granularity == "tensor"
    block = recipe.block_of(layer) if blockwise else None
    if blockwise and (not block or in_f % block):
        raise ConfigError(f"{layer} has {in_f} inputs, not a multiple of the INT4 block size {block}; leave it unquantized")
    want = (out_f, in_f // block) if blockwise else () if per_tensor else (out_f,)
    if tuple(wscale.shape) != want:
        raise ArtifactError(f"{p}weight_scale has shape {tuple(wscale.shape)}, expected {want}; re-run `ditrt calibrate`")
    wq = _const(graph, f"{layer}.weight_quantized", quantized_weight(weight, wscale, spec.weight_format))
    if blockwise:  # scales (in // block, out): block-wise along the input dimension of the (in, out) weight
        ws = _const(graph, f"{layer}.weight_scale", _graph_scale(wscale.t().contiguous(), dtype, f"{layer} weight"))
        attrs = {"axis": 0, "block_size": block}
    elif per_tensor:  # one scale: a per-tensor DQ
        ws = _const(graph, f"{layer}.weight_scale", _graph_scale(wscale.reshape(()), dtype, f"{layer} weight"))
        attrs = {}
    else:  # per output channel: axis 1 of (in, out)
        ws = _const(graph, f"{layer}.weight_scale", _graph_scale(wscale.reshape(-1), dtype, f"{layer} weight"))
        attrs = {"axis": 1}
    dq_w = ir.node("DequantizeLinear", [wq, ws], attributes=attrs, name=f"{layer}/weight_dequantize")
    dq_w.outputs[0].name = f"{layer}.weight_dequantized"
    new = [dq_w]
    if p + "input_divisor" in tensors:  # run-time smoothing: x * (1 / d) ahead of the input's Q/DQ
        mul = _smooth_input(graph, matmul, layer, tensors[p + "input_divisor"], in_f, dtype)
        new.append(mul)
        matmul.replace_input_with(0, mul.outputs[0])
    if spec.quantizes_activations:
        scale = tensors[p + "input_scale"]
        scale = scale[group] if scale.ndim == 1 else scale
        s = _const(graph, f"{layer}.input_scale", _graph_scale(scale.reshape(()), dtype, f"{layer} input"))
        zp = _const(graph, f"{layer}.input_zero_point", np.zeros((), _NP_FORMAT[spec.act_format]))
        saturate = {"saturate": 1} if spec.act_fmt.is_float else {}  # FP8: clamp to +-448, as TensorRT and the simulation do
        q = ir.node("QuantizeLinear", [matmul.inputs[0], s, zp], attributes=saturate, name=f"{layer}/input_quantize")
        q.outputs[0].name = f"{layer}.input_quantized"
        dq = ir.node("DequantizeLinear", [q.outputs[0], s, zp], name=f"{layer}/input_dequantize")
        dq.outputs[0].name = f"{layer}.input_dequantized"
        new += [q, dq]
        matmul.replace_input_with(0, dq.outputs[0])
    graph.insert_before(matmul, new)
    matmul.replace_input_with(1, dq_w.outputs[0])
    _drop_if_unused(graph, old_weight)


def insert_qdq(ir_model, recipe: Recipe, weights: dict[str, torch.Tensor], tensors: dict, *, dtype: str, timestep_group: int = 0) -> int:
    """Quantize every recipe layer of the exported graph in place; returns how many were quantized.

    ``timestep_group``: which of the recipe's activation-scale groups this graph carries.
    ``weights``: layer -> the float32 weight (out, in) the graph was exported with (:func:`layer_weights`).
    """
    graph = ir_model.graph
    name_linear_nodes(graph)
    nodes = find_linears(graph, weights, dtype)
    for name in recipe.layers:
        _insert_layer(graph, nodes[name], name, weights[name], recipe, tensors, dtype, timestep_group)
    log.info("inserted Q/DQ for %d %s layers (%d smoothed at run time)", len(recipe.layers), recipe.precision, len(recipe.runtime_smoothed))
    return len(recipe.layers)
