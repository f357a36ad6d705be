"""The post-training quantization procedure: observe -> balance (fold) -> re-observe -> scales
[-> block reconstruction].

``calibrate(model, config, batches)`` returns a :class:`ditrt.contracts.recipe.Recipe` and its tensors.
Balancing is folded into the weights offline (PTQ4DiT's re-parameterization), so the recipe's
float model computes exactly what the original computes and nothing is left for run time.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ditrt.calibrate import balance as B
from ditrt.calibrate.observe import LayerStats, observe_linear_inputs
from ditrt.calibrate.scale_search import activation_scale, weight_scale
from ditrt.contracts.errors import ConfigError
from ditrt.contracts.files import state_dict_hash
from ditrt.contracts.precisions import INT4_BLOCK_SIZES, get_precision
from ditrt.contracts.recipe import METHODS, CalibrationSettings, Recipe
from ditrt.diffusion.recording import CalibBatch

log = logging.getLogger(__name__)

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
#: balanced layer -> where its divisor is folded (PTQ4DiT sec. 4.3): adaLN rows or the V rows of qkv
BALANCED = {"attn.qkv": "msa", "mlp.fc1": "mlp", "attn.proj": "v"}


@dataclass(frozen=True)
class CalibrateConfig:
    method: str = "ptq4dit"
    precision: str = "w8a8"
    quantize_all: bool = False  # also embedders, adaLN and the final layer (the paper's setting)
    alpha: float = 0.5  # smoothquant migration strength
    scale_search: str | None = None  # None: "minmax" for the minmax method, "mse" otherwise
    symmetric: bool = True  # False: asymmetric, simulation only
    block_size: int = 64  # INT4 block along the input dimension (w4a16); qdit searches it per layer
    timestep_groups: int = 1  # K activation-scale groups over the sampling trajectory (one graph each)
    dynamic_activations: bool = False  # per-sample activation scales at run time (simulation only)
    reconstruct: bool = False  # BRECQ/AdaRound block reconstruction after the scales
    reconstruct_iters: int | None = None  # per block; None: ReconstructSettings' default
    qdit_budget: float | None = None  # qdit: minimum mean INT4 group size (None: no budget)
    qdit_fitness: str = "psnr"  # qdit: "psnr" or "fd" of a small sample set (pixel models), or "proxy" (layer output error)
    qdit_candidates: tuple[int, ...] = INT4_BLOCK_SIZES  # qdit: INT4 choices (0 = per channel, simulation only)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        get_precision(self.precision)
        if self.block_size not in INT4_BLOCK_SIZES:
            raise ConfigError(f"INT4 block size must be 64 or 128 (TensorRT's INT4 formats), got {self.block_size}")
        if self.scale_search not in (None, "minmax", "percentile", "mse"):
            raise ConfigError(f"scale search must be minmax, percentile or mse, got {self.scale_search!r}")
        if self.timestep_groups < 1 or self.timestep_groups > self.calibration.timesteps:
            raise ConfigError(
                f"timestep groups must be between 1 and the {self.calibration.timesteps} recorded timesteps, got {self.timestep_groups}"
            )

    @property
    def search(self) -> str:
        return self.scale_search or ("minmax" if self.method == "minmax" else "mse")


def quantized_layers(model: nn.Module, quantize_all: bool = False) -> list[str]:
    """qkv, proj, fc1, fc2 of every block; with ``quantize_all`` every other Linear too."""
    depth = len(model.blocks)
    layers = [f"blocks.{i}.{n}" for i in range(depth) for n in BLOCK_LINEARS]
    if quantize_all:
        layers = ["t_embedder.mlp.0", "t_embedder.mlp.2"] + layers
        layers += [f"blocks.{i}.adaLN_modulation.1" for i in range(depth)]
        layers += ["final_layer.adaLN_modulation.1", "final_layer.linear"]
    return layers


def balance_factors(model: nn.Module, method: str, stats: dict[str, LayerStats], *, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Compute: the per-channel divisor d of each balanced layer's input, from the unmodified model."""
    factors = {}
    for name, st in stats.items():
        w_sal = B.weight_salience(model.get_submodule(name).weight.detach().float())
        per_step = st.channel_max_by_step()  # (T, C)
        if method == "ptq4dit":  # CSB with Spearman-guided salience over timesteps (SSC)
            s_x, _, _ = B.ssc_salience(per_step, w_sal)
            factors[name] = B.csb_factors(s_x, w_sal)
        elif method == "smoothquant":  # one salience: the max over every step
            factors[name] = B.smoothquant_factors(per_step.amax(0), w_sal, alpha=alpha)
    return factors


def apply_balance(model: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Apply: fold every divisor into the weights (exact in float)."""
    for name, d in factors.items():
        i, layer = int(name.split(".")[1]), name.split(".", 2)[2]
        block = model.blocks[i]
        if BALANCED[layer] == "v":
            B.fold_into_v(block, d)
        else:
            B.fold_into_adaln(block, BALANCED[layer], d)


def group_batches(batches: list[CalibBatch], k: int) -> tuple[list[list[CalibBatch]], tuple[float, ...]]:
    """Split the recorded steps (noisiest first) into ``k`` contiguous groups of near-equal size, and
    the ``k - 1`` descending timestep edges between them (midway between neighbouring recorded steps)."""
    bounds = [round(i * len(batches) / k) for i in range(k + 1)]
    groups = [batches[a:b] for a, b in itertools.pairwise(bounds)]
    edges = tuple((float(g[-1][1][0]) + float(h[0][1][0])) / 2 for g, h in itertools.pairwise(groups))
    return groups, edges


def _balance(work: nn.Module, config: CalibrateConfig, targets: list[str], batches, a_bits, w_bits, granularity, device, details) -> bool:
    """Fold the method's balancing into ``work``; False when the method does not balance here."""
    if config.method == "ditas":
        from ditrt.calibrate.ditas import LayerQuant, ditas_factors

        block = config.block_size if granularity == "block" else None
        quant = LayerQuant(w_bits, a_bits, granularity, block, config.search)
        factors, alphas = ditas_factors(work, targets, batches, quant, seed=config.calibration.seed, device=device)
        details["alpha"] = alphas
    elif config.method in ("ptq4dit", "smoothquant") and a_bits is not None:
        stats = observe_linear_inputs(work, targets, batches, device=device, seed=config.calibration.seed)
        factors = balance_factors(work, config.method, stats, alpha=config.alpha)
    else:
        return False
    apply_balance(work, factors)
    return True


def _block_sizes(work, config, layers, batches, w_bits, granularity, device, details) -> dict[str, int]:
    """qdit: the searched INT4 block per layer; other methods: the configured one everywhere."""
    if config.method != "qdit" or w_bits != 4:
        return {n: (config.block_size if granularity == "block" else 0) for n in layers}
    from ditrt.calibrate.granularity import SearchSettings, search_granularity

    settings = SearchSettings(budget=config.qdit_budget, fitness=config.qdit_fitness, seed=config.calibration.seed)
    choice, report = search_granularity(
        work, layers, batches, bits=w_bits, settings=settings, candidates=config.qdit_candidates, scale_search=config.search
    )
    details["granularity_search"] = report
    return choice


def calibrate(model: nn.Module, config: CalibrateConfig, batches: list[CalibBatch], *, device: str = "cpu") -> tuple[Recipe, dict]:
    """Quantize ``model`` (left untouched) with ``config`` on recorded calibration ``batches``."""
    import copy

    p = get_precision(config.precision)
    w_bits, a_bits, granularity = p.weight_bits, p.act_bits, p.weight_granularity
    model_hash = state_dict_hash(model)
    work = copy.deepcopy(model).eval()
    layers = quantized_layers(work, config.quantize_all)
    notes, details = [], {}
    if config.precision == "w4a8":
        notes.append("w4a8 (INT4 weights, INT8 activations) is a simulation-only setting: TensorRT has no such format")
    if not config.symmetric:
        notes.append("asymmetric quantizers are simulation-only: TensorRT requires zero point 0")
    if config.dynamic_activations:
        notes.append("dynamic per-sample activation scales are simulation-only: TensorRT's Q/DQ scales are constants")
    if a_bits is None and config.method in ("ptq4dit", "smoothquant"):
        notes.append(f"{config.method}: balancing skipped, activations are not quantized at {config.precision} "
                     "(moving activation range into INT4 weights can only hurt)")  # fmt: skip
    if config.method == "qdit" and w_bits == 8:
        notes.append("qdit: INT8 weights are per channel in TensorRT, so there is no granularity to search at w8a8")

    targets = [n for n in layers if n.split(".", 2)[-1] in BALANCED and n.startswith("blocks.")]
    balanced = targets if _balance(work, config, targets, batches, a_bits, w_bits, granularity, device, details) else []
    blocks = _block_sizes(work, config, layers, batches, w_bits, granularity, device, details)

    tensors = {f"model.{k}": v.detach().cpu() for k, v in work.state_dict().items()}
    for name in layers:
        w = work.get_submodule(name).weight.detach().float().cpu()
        block = blocks[name]
        scale, zp = weight_scale(
            w, w_bits, granularity="block" if block else "channel", block_size=block or None, symmetric=config.symmetric, search=config.search
        )
        tensors[f"quant.{name}.weight_scale"] = scale
        if zp is not None:
            tensors[f"quant.{name}.weight_zero_point"] = zp
    edges: tuple[float, ...] = ()
    if a_bits is not None:  # activation scales are measured on the balanced model, per timestep group
        groups, edges = group_batches(batches, config.timestep_groups)
        per_group = [_activation_scales(work, layers, g, a_bits, config, device) for g in groups]
        for name in layers:
            scales = [pg[name] for pg in per_group]
            for key, i in (("input_scale", 0), ("input_zero_point", 1)):
                if scales[0][i] is not None:
                    tensors[f"quant.{name}.{key}"] = scales[0][i] if len(scales) == 1 else torch.stack([s[i] for s in scales])
    elif config.timestep_groups > 1:
        notes.append(f"timestep groups ignored: {config.precision} does not quantize activations")
    layer_blocks = blocks if config.method == "qdit" and w_bits == 4 else {}
    recipe = Recipe(
        method=config.method, precision=config.precision, layers=tuple(layers), model_hash=model_hash,
        model_config=model.config.to_dict(), weight_bits=w_bits, act_bits=a_bits, weight_granularity=granularity,
        block_size=config.block_size if granularity == "block" else None, symmetric=config.symmetric,
        scale_search=config.search, act_scale_search=config.search,
        alpha=config.alpha if config.method == "smoothquant" else None, calibration=config.calibration,
        balanced_layers=tuple(balanced), layer_block_sizes=layer_blocks, timestep_group_edges=edges,
        dynamic_activations=config.dynamic_activations, details=details, notes=tuple(notes),
    )  # fmt: skip
    if config.reconstruct:
        recipe, tensors = _reconstruct(model, recipe, tensors, batches, config, device)
    return recipe, tensors


def _activation_scales(work, layers, batches, a_bits, config, device) -> dict[str, tuple]:
    stats = observe_linear_inputs(work, layers, batches, device=device, seed=config.calibration.seed)
    return {
        name: activation_scale(stats[name].sample_values(), a_bits, symmetric=config.symmetric, search=config.search, absmax=stats[name].absmax)
        for name in layers
    }


def _reconstruct(model, recipe: Recipe, tensors: dict, batches, config: CalibrateConfig, device) -> tuple[Recipe, dict]:
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
    new, report = reconstruct(model, single, view, batches, settings, device=device, progress=True)
    if grouped:
        for name in recipe.layers:
            new[f"quant.{name}.input_scale"] = tensors[f"quant.{name}.input_scale"]
    details = {**recipe.details, "reconstruction": {"settings": dataclasses.asdict(settings), **report}}
    return dataclasses.replace(recipe, reconstructed=True, details=details), new
