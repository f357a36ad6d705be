"""``export_onnx``: a DiT (float, or folded and quantized by a recipe) to one ONNX file.

Float graphs come from the dynamo exporter (``torch.onnx.export(dynamo=True)``, the default since
torch 2.9); it records every node's module path, which :mod:`ditrt.export.qdq` uses to find each
Linear's MatMul. The TorchScript exporter is not used: it is deprecated and writes invalid ONNX for
float16 models. Quantized graphs are the folded float graph with Q/DQ inserted at the graph level
(:mod:`ditrt.export.qdq`); the exporter's fake-quant support cannot express INT4 or dynamic batch.

The I/O contract is :mod:`ditrt.contracts.spec`: ``x, t, y -> out``, float32 at the boundary, dynamic
``batch``. Files are written atomically; models whose weights do not fit in one protobuf (2 GiB)
keep their weights in ``<name>.data`` next to the graph (ONNX external data).

Memory: beside the caller's model and recipe, an export holds one more copy of the weights at most
(none for float32: the traced copy shares them), and writes the file one tensor at a time
(:mod:`ditrt.export.onnx_file`); ``bench/export_scale.py`` measures it on DiT-XL/2.
"""

from __future__ import annotations

import collections
import copy
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditrt import __version__
from ditrt.contracts.errors import ArtifactError, ConfigError
from ditrt.contracts.files import atomic_write, state_dict_hash, tensors_sha256
from ditrt.contracts.groups import group_graph_path, write_manifest
from ditrt.contracts.model_config import config_metadata
from ditrt.contracts.recipe import Recipe, folded_state
from ditrt.contracts.spec import INPUT_NAMES, OUTPUT_NAMES, DiTSpec
from ditrt.models.dit import DiT, PatchEmbed, TimestepEmbedder

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
#: 21: per-axis Q/DQ (13), float16 scales (19), INT4 and ``block_size`` (21) in one opset; 23 would
#: let the exporter emit the fused ``Attention`` op, which leaves no place for a BMM Q/DQ.
DEFAULT_OPSET = 21
MIN_OPSET, MAX_OPSET = 18, 22  # 18: the exporter's lowest (asked for 17 it converts down and writes invalid Split nodes)
#: Above this many bytes of initializers the weights go to external data (protobuf caps a file at 2 GiB;
#: the margin leaves room for the graph itself).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Node metadata the exporter writes that names local source paths: dropped so that the same
#: model exports to the same bytes on every machine (engines are cached by the ONNX hash); and the
#: module namespace and class hierarchy of each node, which repeat what ``name_scopes`` says (the one
#: key Q/DQ insertion reads) in longer form: 40% of a graph's bytes outside its weights.
_DROPPED_NODE_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "namespace", "pkg.torch.onnx.class_hierarchy")
#: The exporter's optimizer (constant folding, which also pre-transposes the Linear weights); tests
#: turn it off to see that Q/DQ insertion handles unfolded ``Transpose(W) -> MatMul`` too.
_OPTIMIZE = True


def export_onnx(
    model: DiT,
    path: str | os.PathLike,
    *,
    dtype: str = "fp32",
    opset: int | None = None,
    recipe: Recipe | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    batch: int = 2,
    external_data: bool | None = None,
    timestep_group: int | None = None,
) -> Path:
    """Export ``model`` to ``path`` and return it.

    ``dtype``: "fp32" or "fp16" (weights and activations float16, LayerNorm in float32 through
    Casts, float32 graph boundary). ``recipe`` and ``tensors`` (from :func:`ditrt.contracts.recipe.load_recipe`):
    export the recipe's folded weights with Q/DQ for its quantized layers (w8a8, w4a16); recipes that
    TensorRT cannot run are refused. ``opset``: None means :data:`DEFAULT_OPSET`. ``batch``: the batch
    the model is traced at (the graph's batch axis stays dynamic). ``external_data``: None writes
    external data only when the weights exceed :data:`EXTERNAL_DATA_THRESHOLD`. ``timestep_group``:
    for a recipe with K timestep groups of activation scales, which group's graph to write (the
    weights are the same in all K; :func:`export_timestep_groups` writes them all with a manifest).
    """
    from ditrt.export import qdq

    opset = DEFAULT_OPSET if opset is None else opset
    _check_options(dtype, opset, batch)
    if (recipe is None) != (tensors is None):
        raise ConfigError("pass both recipe and tensors (from ditrt.contracts.recipe.load_recipe), or neither")
    model_hash = state_dict_hash(model)
    if recipe is not None:
        qdq.check_exportable(recipe, tensors, dtype=dtype, opset=opset, model_hash=model_hash, timestep_group=timestep_group)
        weights = qdq.layer_weights(model, recipe, tensors)  # float32 (out, in), folded
    folded = (folded_state(tensors) or None) if recipe is not None else None
    ir_model = _export_float(export_copy(model, dtype, state=folded), opset, batch)
    gc.collect()  # the traced copy and the exporter's program: weights the graph no longer uses go now
    if recipe is not None:
        qdq.insert_qdq(ir_model, recipe, weights, tensors, dtype=dtype, timestep_group=timestep_group or 0)
    else:
        qdq.name_linear_nodes(ir_model.graph)
    ir_model.metadata_props.update(_metadata(model, dtype, model_hash, recipe, tensors))
    if recipe is not None and recipe.timestep_groups > 1:
        ir_model.metadata_props["ditrt.timestep_group"] = str(timestep_group)
        ir_model.metadata_props["ditrt.timestep_group_edges"] = json.dumps(list(recipe.timestep_group_edges))
    return save_model(ir_model, Path(path), external_data=external_data)


def _check_options(dtype: str, opset: int, batch: int) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"unknown export dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(
            f"opset {opset} is not supported: use {MIN_OPSET}-{MAX_OPSET} (default {DEFAULT_OPSET}); "
            "the exporter writes invalid graphs below 18, and opset 23 fuses attention into one op that cannot be quantized"
        )
    if not isinstance(batch, int) or batch < 2:
        raise ConfigError(f"the trace batch must be an integer >= 2 (1 would be baked into the graph), got {batch!r}")


# ------------------------------------------------------------------------------ float16 preparation
class _Float32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (float16 LayerNorm overflows in large transformers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class _ExportTimestepEmbedder(TimestepEmbedder):
    """:func:`timestep_embedding` with its frequencies in a float32 buffer computed by torch.

    Left to itself the exporter folds ``exp(-log(10000) * k / half)`` into a constant with another
    libm, 1 ulp off for a third of the entries; at t ~ 1000 that moves ``sin(t * f)`` by 5e-5, enough
    to flip the INT8 rounding of the next Linear's input. The sinusoid stays float32 in float16 graphs
    (float16 spacing at t = 999 is 0.5); the MLP runs in the weights' dtype.
    """

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t[:, None].float() * self.freqs[None]  # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.freq_dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class _ExportPatchEmbed(PatchEmbed):
    """The stride-``p`` patch convolution written as what it computes: the patches of the (small) input
    gathered by Reshape/Transpose into (N, T, C*p*p), then one MatMul by the convolution's weight seen as
    (D, C*p*p). ONNX Runtime runs the Conv in its blocked layout (Conv, ReorderOutput, then the
    (N, D, T) -> (N, T, D) Transpose of the large output): this form takes about half the time, 0.27
    vs 0.52 ms at the built-in model's step (64 rows), 1.8 vs 3.6 ms at DiT-XL/2's (8 rows; one thread,
    ``bench/results/ort_profile/forms-*.md``, issue 15). The same
    values (the same products, summed over C*p*p in another order: bit-identical for the built-in
    model's 1x1 patch); TensorRT takes either form. Parameters stay ``proj.weight``/``proj.bias``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.proj.kernel_size[0]
        patches = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, c * p * p), self.proj.bias)


def _timestep_frequencies(freq_dim: int, freq_shift: int, max_period: float = 10000.0) -> torch.Tensor:
    half = freq_dim // 2  # the expression of ditrt.models.dit.timestep_embedding, evaluated by torch
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - freq_shift))


def _with_float32_io(cls: type) -> type:
    """A subclass of ``cls`` whose forward takes and returns float32 around a float16 body."""

    def forward(self, x, t, y):
        return cls.forward(self, x.to(torch.float16), t, y).float()

    return type(f"{cls.__name__}Float16", (cls,), {"forward": forward})


def export_copy(model: DiT, dtype: str = "fp32", *, state: dict[str, torch.Tensor] | None = None) -> DiT:
    """The module that is traced: an eval copy with exact timestep frequencies and the patch embedding
    as a MatMul (:class:`_ExportPatchEmbed`); for "fp16" also float16 weights, float32 LayerNorms and
    timestep sinusoid, and a float32 graph boundary.

    ``state``: the weights to trace instead of the model's own (a recipe's folded ``model.*``, prefix
    stripped; every key of the model's state dict, as ``load_state_dict`` wants). No weight is copied
    that need not be: a float32 copy shares the tensors of ``model`` (or ``state``), a float16 one
    converts them one at a time (a DiT-XL/2 is 2.7 GB in float32). Classes are swapped in place
    rather than wrapped, so that parameter names and the module paths the exporter records stay
    those of the checkpoint (Q/DQ insertion finds layers by them).
    """
    own = model.state_dict(keep_vars=True)
    if state is not None:
        _check_state(own, state)
    memo = {id(t): _traced_tensor(t, t if state is None else state[name], dtype) for name, t in own.items()}
    m = copy.deepcopy(model, memo).cpu().eval()
    if dtype == "fp16":
        for mod in m.modules():
            if type(mod) is nn.LayerNorm:
                mod.__class__ = _Float32LayerNorm
        m.__class__ = _with_float32_io(type(m))
        m.half()  # what is left: tensors outside the state dict
    for mod in m.modules():
        if type(mod) is PatchEmbed:
            mod.__class__ = _ExportPatchEmbed
        if type(mod) is TimestepEmbedder:
            mod.__class__ = _ExportTimestepEmbedder
            mod.register_buffer("freqs", _timestep_frequencies(mod.freq_dim, mod.freq_shift), persistent=False)
    return m


def _traced_tensor(own: torch.Tensor, source: torch.Tensor, dtype: str) -> torch.Tensor:
    """``source`` as the traced copy holds ``own``: same kind (Parameter or buffer), on the CPU, in
    ``own``'s dtype (float16 for a float16 copy); the same storage when nothing changes."""
    to = torch.float16 if dtype == "fp16" and own.is_floating_point() else own.dtype
    data = source.detach().to("cpu", to)
    return nn.Parameter(data, requires_grad=own.requires_grad) if isinstance(own, nn.Parameter) else data


def _check_state(own: dict, state: dict) -> None:
    """Refuse recipe weights that ``load_state_dict`` would refuse: other names or shapes."""
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        what = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                else f"{wrong[0]} shaped {tuple(state[wrong[0]].shape)}, not {tuple(own[wrong[0]].shape)}")  # fmt: skip
        raise ArtifactError(f"the recipe's folded weights do not fit the model ({what}); re-run `ditrt calibrate` for this model")


# ------------------------------------------------------------------------------------------ export
def _export_float(traced: DiT, opset: int, batch: int):
    """The float graph of ``traced`` (an :func:`export_copy`) as an ``onnx_ir.Model``, the dynamo
    exporter's own IR (it holds graphs over 2 GiB, and INT4 tensors)."""
    spec = DiTSpec.of(traced)
    # the exporter logs one warning per torchvision op it cannot register; ditrt uses none of them
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns about shared batch symbols and deprecations
        program = torch.onnx.export(
            traced,
            spec.sample_inputs(batch),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=spec.dynamic_shapes(),
            opset_version=opset,
            dynamo=True,
            optimize=_OPTIMIZE,
            verbose=False,
        )
    registration.setLevel(level)
    ir_model = program.model
    for node in ir_model.graph:
        for key in _DROPPED_NODE_METADATA:
            node.metadata_props.pop(key, None)
    _forget_removed_inputs(ir_model.graph)
    return ir_model


def _forget_removed_inputs(graph) -> None:
    """Let go of the values the exporter once made graph inputs and then removed.

    onnx_ir (1.1) counts a graph's inputs in a Counter and leaves a removed value in it at count 0,
    so every initializer the exporter's optimizer replaced stays alive, with its weights: the
    untransposed Linear weights, which Q/DQ insertion would otherwise free as it replaces each one
    by its integers (0.85 GB for a float16 DiT-XL/2). A zero count means absent to a Counter."""
    counter = getattr(graph.inputs, "_ref_counter", None)
    if isinstance(counter, collections.Counter):
        for value in [v for v, n in counter.items() if n <= 0]:
            del counter[value]


def _metadata(model: DiT, dtype: str, model_hash: str, recipe: Recipe | None, tensors) -> dict[str, str]:
    meta = {
        "ditrt.version": __version__,
        **config_metadata(model.config),
        "ditrt.model_hash": model_hash,
        "ditrt.dtype": dtype,
        "ditrt.precision": recipe.precision if recipe is not None else dtype,
        "ditrt.io": json.dumps({"inputs": list(INPUT_NAMES), "outputs": list(OUTPUT_NAMES), "batch_dim": "batch"}),
    }
    if recipe is not None:
        meta.update(
            {
                "ditrt.recipe.method": recipe.method,
                "ditrt.recipe.precision": recipe.precision,
                "ditrt.recipe.layers": str(len(recipe.layers)),
                "ditrt.recipe.sha256": recipe_hash(recipe, tensors),
            }
        )
    return meta


def recipe_hash(recipe: Recipe, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the recipe JSON and every recipe tensor (names, shapes, dtypes, bytes)."""
    return tensors_sha256(tensors, hashlib.sha256(recipe.to_json().encode()))


# -------------------------------------------------------------------------------------------- save
def initializer_bytes(ir_model) -> int:
    return sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)


def save_model(ir_model, path: Path, *, external_data: bool | None = None) -> Path:
    """Write atomically: a temp file renamed over ``path``; with external data, both files are
    written in a temp folder beside ``path``, the data file is moved first and the graph last, so a
    reader never sees a graph whose data is missing. Either way the weights are written one tensor at
    a time (:func:`ditrt.export.onnx_file.save_protobuf`, or onnx_ir's external data writer)."""
    import onnx_ir as ir

    from ditrt.export.onnx_file import INLINE_BYTES, save_protobuf

    path = Path(path)
    data_name = path.name + ".data"
    stale = path.parent / data_name
    if external_data is None:
        external_data = initializer_bytes(ir_model) > EXTERNAL_DATA_THRESHOLD
    if not external_data:
        atomic_write(path, lambda tmp: save_protobuf(ir_model, tmp))
        if stale.exists():  # an earlier export of this name had external data: it is no longer used
            stale.unlink()
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        ir.save(ir_model, tmp_dir / path.name, format="protobuf", external_data=data_name, size_threshold_bytes=INLINE_BYTES)
        os.replace(tmp_dir / data_name, path.parent / data_name)
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("wrote %s with external data %s", path, data_name)
    return path


# ------------------------------------------------------------------------------- timestep groups
def export_timestep_groups(model: DiT, path: str | os.PathLike, *, recipe: Recipe, tensors: dict[str, torch.Tensor], **kwargs) -> Path:
    """Write one graph per activation-scale group of ``recipe`` (``<stem>.g<i>.onnx``; the weights are
    identical, only the activation scales differ) and the manifest ``<stem>.groups.json`` that the
    runtime reads to pick a graph by timestep. Returns the manifest's path."""
    graphs = [
        export_onnx(model, group_graph_path(path, g), recipe=recipe, tensors=tensors, timestep_group=g, **kwargs)
        for g in range(recipe.timestep_groups)
    ]
    return write_manifest(path, recipe.timestep_group_edges, graphs, "onnx")


def export_model(model: DiT, path: str | os.PathLike, *, recipe: Recipe | None = None, tensors: dict | None = None, **kwargs) -> Path:
    """The export stage's one entry point: the artifact for ``model`` (and ``recipe``) at ``path``.

    A recipe with K > 1 timestep groups of activation scales gives K graphs and their manifest
    (:func:`export_timestep_groups`; the manifest's path is returned); anything else one graph
    (:func:`export_onnx`), which every later stage reads as a one-group manifest
    (:func:`ditrt.contracts.groups.read_artifact`). ``kwargs``: those of :func:`export_onnx`."""
    if recipe is not None and recipe.spec.quantizes_activations and recipe.timestep_groups > 1:
        return export_timestep_groups(model, path, recipe=recipe, tensors=tensors, **kwargs)
    return export_onnx(model, path, recipe=recipe, tensors=tensors, **kwargs)
