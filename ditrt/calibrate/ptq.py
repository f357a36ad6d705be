"""The post-training quantization procedure: observe -> method (balance: fold; INT4 blocks) ->
re-observe -> scales [-> block reconstruction].

``calibrate(model, config, forward_loop)`` returns a :class:`ditrt.contracts.recipe.Recipe` and its
tensors, ModelOpt's ``quantize(model, config, forward_loop)`` shape. The method is a strategy from
:mod:`ditrt.calibrate.methods` that owns its settings (``config.method_settings``); the procedure asks
it for the steps it takes and never branches on its name. Balancing is folded into the weights
offline (PTQ4DiT's re-parameterization), so the recipe's float model computes exactly what the
original computes and nothing is left for run time, except, with ``smooth_fc2``, a per-channel
multiply by 1/d on each fc2 input (``quant.L.input_divisor``).

Several processes (``torchrun``; pass their ``world``) compute the recipe a single process computes,
bit for bit: the observation passes run in fixed row slices (:data:`ditrt.calibrate.observe.OBSERVE_ROWS`)
shared over the ranks and their statistics reduce exactly (maxima by all-reduce, value subsets chosen
by index in the whole batch); the per-layer weight and activation scale searches and DiTAS' alpha
searches are shared by layer and gathered. The rest runs identically on every rank: balancing
factors from the reduced statistics (every rank folds rank 0's), Q-DiT's block search, and block
reconstruction. Only the caller's rank 0 should write the result.

Device memory on ``device`` for DiT-XL/2 (675M parameters, 256 tokens, hidden 1152), expected peak
about 6 GB without reconstruction: the caller's model and the working copy, 2 x 2.7 GB in float32;
one observation slice of 16 rows (4096 tokens): its largest activations are the MLP's 4096 x 4608
(75 MB each, a few alive at once) and the attention maps 16 x 16 heads x 256 x 256 (67 MB, two alive),
under 0.5 GB in all; the statistics: per quantized Linear 25 steps x (C + 4096 values) floats, about
70 MB for the 112 Linears (DiTAS' captured rows add 25 x 64 x 1152 floats per balanced layer, 0.6 GB);
a weight scale search holds a few copies of one weight (fc1: 21 MB each). The recorded batches stay on
the CPU (25 x 64 rows x 4 x 32 x 32: 26 MB) and go to the device a slice at a time, so the peak does
not grow with --calib-samples. Block reconstruction (opt-in) adds two more model copies, its cached
block inputs and targets (7.5 GB at 25 x 64 rows, see :func:`ditrt.calibrate.reconstruct.reconstruct`)
and one block's training activations: about 20 GB.
"""

from __future__ import annotations

import itertools
import logging

import torch
from torch import nn

from ditrt.calibrate.balance import BALANCED, apply_balance  # noqa: F401  (apply_balance: re-exported for callers)
from ditrt.calibrate.config import CalibrateConfig
from ditrt.calibrate.methods import Balanced, Step
from ditrt.calibrate.observe import observe_linear_inputs
from ditrt.calibrate.scale_search import activation_scale, weight_scale
from ditrt.contracts.errors import ConfigError
from ditrt.contracts.files import state_dict_hash
from ditrt.contracts.precisions import get_precision
from ditrt.contracts.recipe import Recipe
from ditrt.diffusion.recording import CalibBatch
from ditrt.distributed import SINGLE, World, map_items

log = logging.getLogger(__name__)

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def quantized_layers(model: nn.Module, quantize_all: bool = False) -> list[str]:
    """qkv, proj, fc1, fc2 of every block; with ``quantize_all`` every other Linear too."""
    depth = len(model.blocks)
    layers = [f"blocks.{i}.{n}" for i in range(depth) for n in BLOCK_LINEARS]
    if quantize_all:
        layers = ["t_embedder.mlp.0", "t_embedder.mlp.2"] + layers
        layers += [f"blocks.{i}.adaLN_modulation.1" for i in range(depth)]
        layers += ["final_layer.adaLN_modulation.1", "final_layer.linear"]
    return layers


def group_batches(batches: list[CalibBatch], k: int) -> tuple[list[list[CalibBatch]], tuple[float, ...]]:
    """Split the recorded steps (noisiest first) into ``k`` contiguous groups of near-equal size, and
    the ``k - 1`` descending timestep edges between them (midway between neighbouring recorded steps)."""
    bounds = [round(i * len(batches) / k) for i in range(k + 1)]
    groups = [batches[a:b] for a, b in itertools.pairwise(bounds)]
    edges = tuple((float(g[-1][1][0]) + float(h[0][1][0])) / 2 for g, h in itertools.pairwise(groups))
    return groups, edges


def calibrate(model: nn.Module, config: CalibrateConfig, forward_loop: list[CalibBatch], *, device: str = "cpu",
              world: World = SINGLE) -> tuple[Recipe, dict]:  # fmt: skip
    """Quantize ``model`` (left untouched; on ``device``) with ``config`` on the calibration data
    ``forward_loop``: the recorded batches ``[(x (N, C, H, W), t (N,), y (N,)), ...]`` of
    :func:`ditrt.diffusion.recording.record_calibration_inputs`, noisiest step first (each batch is
    run through the model several times, in slices, with observation hooks installed around it).
    ``world``: the torchrun job whose ranks share the work; each rank passes the same batches and gets
    the same recipe, and the returned tensors are on the CPU."""
    import copy

    batches = _batches(forward_loop)
    p = get_precision(config.precision)
    w_fmt, a_fmt, granularity = p.weight_fmt, p.act_fmt, p.weight_granularity  # the grids every quantizer rounds onto
    method = config.strategy
    model_hash = state_dict_hash(model)
    work = copy.deepcopy(model).eval()
    layers = quantized_layers(work, config.quantize_all)
    notes = []
    if not p.tensorrt:
        acts = p.act_format.upper() if p.act_format else "float"
        notes.append(f"{p.name} ({p.weight_format.upper()} weights, {acts} activations) is a simulation-only setting: TensorRT has no such format")
    if not config.symmetric:
        notes.append("asymmetric quantizers are simulation-only: TensorRT requires zero point 0")
    if config.dynamic_activations:
        notes.append("dynamic per-sample activation scales are simulation-only: TensorRT's Q/DQ scales are constants")
    notes += method.notes(p)

    targets = [n for n in layers if n.split(".", 2)[-1] in BALANCED and n.startswith("blocks.")]
    step = Step(work, layers, targets, batches, p, config, device, world)
    balanced: Balanced | None = method.balance(step)
    searched = method.block_sizes(step)
    blocks = searched if searched is not None else {n: step.block or 0 for n in layers}
    details = dict(step.details)
    if balanced is not None:
        details["balance"] = balanced.summary()
        if balanced.skipped:
            log.info("balancing left %d channels at d = 1 (degenerate salience): %s", balanced.skipped, balanced.summary()["per_layer"])

    tensors = {f"model.{k}": v.detach().cpu() for k, v in work.state_dict().items()}
    runtime = balanced.runtime_divisors if balanced is not None else {}  # fc2 smoothing: run-time input divisors
    for name, d in runtime.items():
        tensors[f"quant.{name}.input_divisor"] = d.detach().float().cpu()
    wants_rows = "output" in (config.weight_scale_search, config.act_scale_search)
    rows = _captured_rows(work, layers, batches, config, device, world) if wants_rows else {}

    def scales_of_weight(name: str):  # on the device, one layer per rank at a time
        w, block = work.get_submodule(name).weight.detach().float(), blocks[name]
        gram = None
        if config.weight_scale_search == "output":
            x = rows[name].rows.to(w.device)
            gram = x.T @ x
        scale, zp = weight_scale(w, w_fmt, granularity="block" if block else _unblocked(granularity), block_size=block or None,
                                 symmetric=config.symmetric, search=config.weight_scale_search, gram=gram)  # fmt: skip
        return scale.cpu(), None if zp is None else zp.cpu()

    for name, (scale, zp) in zip(layers, map_items(scales_of_weight, layers, world)):
        tensors[f"quant.{name}.weight_scale"] = scale
        if zp is not None:
            tensors[f"quant.{name}.weight_zero_point"] = zp
    if config.weight_rounding == "gptq":  # Hessian-compensated rounding on the same grids, written back on the grid
        from ditrt.calibrate.gptq import gptq_weights

        scales = {n: tensors[f"quant.{n}.weight_scale"] for n in layers}
        rounded, details["gptq"] = gptq_weights(work, layers, batches, scales, w_fmt, blocks, device=device, world=world,
                                                progress=world.is_main)  # fmt: skip
        for name, w in rounded.items():
            tensors[f"model.{name}.weight"] = w
    edges: tuple[float, ...] = ()
    if a_fmt is not None:  # activation scales are measured on the balanced model, per timestep group
        groups, edges = group_batches(batches, config.timestep_groups)
        per_group = [_activation_scales(work, layers, g, a_fmt, w_fmt, config, device, world, tensors,
                                        rows if len(groups) == 1 else None)
                     for g in groups]  # fmt: skip
        for name in layers:
            scales = [pg[name] for pg in per_group]
            for key, i in (("input_scale", 0), ("input_zero_point", 1)):
                if scales[0][i] is not None:
                    tensors[f"quant.{name}.{key}"] = scales[0][i] if len(scales) == 1 else torch.stack([s[i] for s in scales])
    recipe = Recipe(
        method=config.method, precision=config.precision, layers=tuple(layers), model_hash=model_hash,
        model_config=model.config.to_dict(), weight_bits=p.weight_bits, act_bits=p.act_bits, weight_granularity=granularity,
        block_size=config.block_size if granularity == "block" else None, symmetric=config.symmetric,
        scale_search=config.weight_scale_search, act_scale_search=config.act_scale_search,
        alpha=getattr(config.settings, "alpha", None), calibration=config.calibration,
        balanced_layers=balanced.layers if balanced is not None else (), layer_block_sizes=searched or {},
        timestep_group_edges=edges, dynamic_activations=config.dynamic_activations, details=details, notes=tuple(notes),
        weight_rounding=config.weight_rounding, runtime_smoothed=tuple(runtime),
    )  # fmt: skip
    if config.reconstruct:
        recipe, tensors = _reconstruct(model, recipe, tensors, batches, config, device, progress=world.is_main)
    if config.min_psnr is not None or config.max_float_layers is not None:
        recipe, tensors = _fall_back(model, work, recipe, tensors, config, device, world)
    return recipe, tensors


def _unblocked(granularity: str) -> str:
    """The scale granularity of a layer without an INT4 block: the precision's own ("channel" or "tensor")."""
    return "channel" if granularity == "block" else granularity


def _batches(forward_loop) -> list[CalibBatch]:
    if callable(forward_loop) or not all(isinstance(b, (tuple, list)) and len(b) == 3 for b in forward_loop):
        raise ConfigError(
            "calibrate takes the recorded calibration batches [(x, t, y), ...]; record them with "
            "ditrt.diffusion.recording.record_calibration_inputs(model, settings)"
        )
    if not forward_loop:
        raise ConfigError("calibrate got no calibration batches; record at least one timestep")
    return list(forward_loop)


#: Token rows per recorded batch that the output-aware search scores its clips on (DiTAS' capture size):
#: 25 x 64 rows of every quantized Linear's input, about 1.5 GB for DiT-XL/2's 112 Linears in float32.
OUTPUT_SEARCH_ROWS = 64


def _captured_rows(work, layers, batches, config: CalibrateConfig, device, world: World) -> dict:
    """The recorded input rows of every layer (:func:`ditrt.calibrate.observe.capture_layer_inputs`), for the output-aware search."""
    from ditrt.calibrate.observe import capture_layer_inputs

    return capture_layer_inputs(work, layers, batches, tokens_per_batch=OUTPUT_SEARCH_ROWS, seed=config.calibration.seed,
                                device=device, world=world)  # fmt: skip


def _activation_scales(work, layers, batches, a_fmt, w_fmt, config, device, world: World, tensors: dict,
                       rows: dict | None = None) -> dict[str, tuple]:  # fmt: skip
    """``{layer: (scale, zero point or None)}`` (CPU) from the reduced statistics, layers shared over the ranks.
    The output-aware search scores clips on the rows of these ``batches`` (``rows``: already captured on
    them) against the weight the layer runs with (its recipe weight on ``tensors``' scale)."""
    from ditrt.contracts.quantizers import fake_quant_weight

    stats = observe_linear_inputs(work, layers, batches, device=device, seed=config.calibration.seed, world=world)
    if config.act_scale_search == "output" and rows is None:
        rows = _captured_rows(work, layers, batches, config, device, world)

    def search(name: str):
        extra = {}
        if config.act_scale_search == "output":
            w = work.get_submodule(name).weight.detach().float()
            stored = tensors[f"model.{name}.weight"].to(w.device).float()  # the GPTQ-rounded weight where it was rounded
            zp = tensors.get(f"quant.{name}.weight_zero_point")
            wq = fake_quant_weight(stored, tensors[f"quant.{name}.weight_scale"].to(w.device),
                                   None if zp is None else zp.to(w.device), w_fmt, config.symmetric)  # fmt: skip
            extra = {"rows": rows[name].rows.to(w.device), "weight": w, "weight_q": wq}
        scale, zp = activation_scale(stats[name].sample_values(), a_fmt, symmetric=config.symmetric,
                                     search=config.act_scale_search, absmax=stats[name].absmax, **extra)  # fmt: skip
        return scale.cpu(), None if zp is None else zp.cpu()

    return dict(zip(layers, map_items(search, layers, world)))


def _fall_back(model, work, recipe: Recipe, tensors: dict, config: CalibrateConfig, device, world: World) -> tuple[Recipe, dict]:
    """Leave the most sensitive layers in float under the budget (:mod:`ditrt.calibrate.fallback`). A layer
    left in float gets its balanced float weight back; one smoothed at run time gets the original weight
    and loses its divisor (a float layer needs no smoothing; choose_float_layers drops it)."""
    from ditrt.calibrate.fallback import FallbackSettings, choose_float_layers
    from ditrt.distributed import broadcast_object

    floats = {n: (model if n in recipe.runtime_smoothed else work).get_submodule(n).weight.detach().float().cpu() for n in recipe.layers}
    settings = FallbackSettings(min_psnr=config.min_psnr, max_float_layers=config.max_float_layers)
    new, new_tensors, _ = choose_float_layers(model, recipe, tensors, floats, settings, device=device, progress=world.is_main)
    chosen = broadcast_object(sorted(new.float_layers), world)  # every rank keeps rank 0's choice
    if sorted(new.float_layers) != chosen:
        raise RuntimeError("the ranks chose different float layers; run the fallback in one process")
    return new, new_tensors  # choose_float_layers drops a float layer from runtime_smoothed and its divisor


def _reconstruct(model, recipe: Recipe, tensors: dict, batches, config: CalibrateConfig, device, *,
                 progress: bool) -> tuple[Recipe, dict]:  # fmt: skip
    """Block reconstruction on a single-group view of the recipe; grouped activation scales are kept as
    calibrated (reconstruction learns one step size per layer, over every timestep)."""
    import dataclasses

    from ditrt.calibrate.reconstruct import ReconstructSettings, reconstruct

    settings = ReconstructSettings(seed=config.calibration.seed)
    if config.reconstruct_iters is not None:
        settings = dataclasses.replace(settings, iters=config.reconstruct_iters)
    grouped = recipe.timestep_groups > 1
    single = dataclasses.replace(recipe, timestep_group_edges=(), dynamic_activations=False)
    view = dict(tensors)
    if grouped:  # one scale for reconstruction: the widest group's
        for name in recipe.layers:
            view[f"quant.{name}.input_scale"] = tensors[f"quant.{name}.input_scale"].amax()
    new, report = reconstruct(model, single, view, batches, settings, device=device, progress=progress)
    if grouped:
        for name in recipe.layers:
            new[f"quant.{name}.input_scale"] = tensors[f"quant.{name}.input_scale"]
    details = {**recipe.details, "reconstruction": {"settings": dataclasses.asdict(settings), **report}}
    return dataclasses.replace(recipe, reconstructed=True, details=details), new
