"""The post-training quantization procedure: observe -> balance (fold) -> re-observe -> scales.

``calibrate(model, config, batches)`` returns a :class:`ditrt.recipe.Recipe` and its tensors.
Balancing is folded into the weights offline (PTQ4DiT's re-parameterization), so the recipe's
float model computes exactly what the original computes and nothing is left for run time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ditrt.calibrate import balance as B
from ditrt.calibrate.observe import CalibBatch, LayerStats, observe_linear_inputs
from ditrt.calibrate.quantizers import activation_scale, weight_scale
from ditrt.errors import ConfigError
from ditrt.models.checkpoints import state_dict_hash
from ditrt.recipe import METHODS, CalibrationSettings, Recipe, precision_settings

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
    block_size: int = 64  # INT4 block along the input dimension (w4a16)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        precision_settings(self.precision)
        if self.block_size not in (64, 128):
            raise ConfigError(f"INT4 block size must be 64 or 128 (TensorRT's INT4 formats), got {self.block_size}")
        if self.scale_search not in (None, "minmax", "percentile", "mse"):
            raise ConfigError(f"scale search must be minmax, percentile or mse, got {self.scale_search!r}")

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


def calibrate(model: nn.Module, config: CalibrateConfig, batches: list[CalibBatch], *, device: str = "cpu") -> tuple[Recipe, dict]:
    """Quantize ``model`` (left untouched) with ``config`` on recorded calibration ``batches``."""
    import copy

    w_bits, a_bits, granularity, _ = precision_settings(config.precision)
    model_hash = state_dict_hash(model)
    work = copy.deepcopy(model).eval()
    layers = quantized_layers(work, config.quantize_all)
    notes = []
    if config.precision == "w4a8":
        notes.append("w4a8 (INT4 weights, INT8 activations) is a simulation-only setting: TensorRT has no such format")
    if not config.symmetric:
        notes.append("asymmetric quantizers are simulation-only: TensorRT requires zero point 0")

    balanced: list[str] = []
    if config.method != "minmax":
        if a_bits is None:
            notes.append(f"{config.method}: balancing skipped, activations are not quantized at {config.precision} "
                         "(moving activation range into INT4 weights can only hurt)")  # fmt: skip
        else:
            targets = [n for n in layers if n.split(".", 2)[-1] in BALANCED and n.startswith("blocks.")]
            stats = observe_linear_inputs(work, targets, batches, device=device, seed=config.calibration.seed)
            apply_balance(work, balance_factors(work, config.method, stats, alpha=config.alpha))
            balanced = targets

    tensors = {f"model.{k}": v.detach().cpu() for k, v in work.state_dict().items()}
    if a_bits is not None:  # activation scales are measured on the balanced model
        stats = observe_linear_inputs(work, layers, batches, device=device, seed=config.calibration.seed)
    for name in layers:
        w = work.get_submodule(name).weight.detach().float().cpu()
        scale, zp = weight_scale(
            w, w_bits, granularity=granularity, block_size=config.block_size if granularity == "block" else None,
            symmetric=config.symmetric, search=config.search,
        )  # fmt: skip
        tensors[f"quant.{name}.weight_scale"] = scale
        if zp is not None:
            tensors[f"quant.{name}.weight_zero_point"] = zp
        if a_bits is not None:
            st = stats[name]
            s, z = activation_scale(st.sample_values(), a_bits, symmetric=config.symmetric, search=config.search, absmax=st.absmax)
            tensors[f"quant.{name}.input_scale"] = s
            if z is not None:
                tensors[f"quant.{name}.input_zero_point"] = z
    recipe = Recipe(
        method=config.method, precision=config.precision, layers=tuple(layers), model_hash=model_hash,
        model_config=model.config.to_dict(), weight_bits=w_bits, act_bits=a_bits, weight_granularity=granularity,
        block_size=config.block_size if granularity == "block" else None, symmetric=config.symmetric,
        scale_search=config.search, act_scale_search=config.search,
        alpha=config.alpha if config.method == "smoothquant" else None, calibration=config.calibration,
        balanced_layers=tuple(balanced), notes=tuple(notes),
    )  # fmt: skip
    return recipe, tensors
