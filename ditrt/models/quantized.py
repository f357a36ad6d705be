"""Simulated (fake-)quantized DiTs: what a recipe computes, in torch.

:class:`QuantLinear` replaces each quantized ``nn.Linear``: it fake-quantizes its input
(per tensor, when the recipe quantizes activations) and its weight (per output channel, per tensor or
block-wise), onto the grids of the recipe's precision (INT8, INT4, FP8 E4M3), with exactly the Q/DQ
semantics the ONNX export writes.

Two activation options beyond one static scale: K timestep groups (``input_scale`` of shape
``(K,)``; the model's forward pre-hook picks the group from ``t``, as the runtime picks one graph
per group), and dynamic per-sample scales (Q-DiT's setting; simulation only, no Q/DQ form).

A layer smoothed at run time (:attr:`ditrt.contracts.recipe.Recipe.runtime_smoothed`, fc2 whose
input, the GELU output, has no fold partner) also holds ``input_divisor`` d (C,): its input is
multiplied by ``1 / d`` (:func:`input_reciprocal`, in the input's dtype) before the input fake-quant,
and its recipe weight already has its columns multiplied by d. The float computation of such a recipe
is therefore the recipe's ``model.*`` weights *plus* that multiply (:func:`folded_float_model`).

Every scale and zero point is a buffer, so ``.to(device)`` moves the whole quantizer. The group is
found where ``t`` lives: on the CPU as one host index (a batch mixing groups is refused, as the
runtime's graphs refuse it), on a GPU as a per-row index tensor computed there, so that a sampler on
the GPU never waits for ``t`` to be read back at each step (:func:`select_timestep_group`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ditrt.contracts.errors import ArtifactError
from ditrt.contracts.quantizers import fake_quant, fake_quant_weight, number_format, qrange
from ditrt.contracts.recipe import Recipe, batch_timestep_group


class QuantLinear(nn.Module):
    """A Linear with fake-quantized input and weight. Scales and zero points are buffers (saved with
    the module and moved by ``.to``); the zero points and the input scale may be None.

    ``group``: the timestep group whose input scale applies, set by the model's pre-hook: an int, or
    a ``(B,)`` int64 tensor of each row's group on the input's device. ``weight_bits``/``act_bits``: the grids,
    integer widths or number formats (:class:`ditrt.contracts.precisions.NumberFormat`, e.g. FP8 E4M3)."""

    def __init__(self, linear: nn.Linear, *, weight_bits, act_bits, symmetric: bool = True, dynamic: bool = False):
        super().__init__()
        self.dynamic = dynamic
        self.group: int | torch.Tensor = 0  # set by the model's pre-hook (see the class doc)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.weight_bits, self.act_bits, self.symmetric = weight_bits, act_bits, symmetric
        self.register_buffer("weight_scale", torch.ones(self.out_features))
        self.register_buffer("weight_zero_point", None)
        self.register_buffer("input_scale", None)  # () per tensor, or (K,) one per timestep group
        self.register_buffer("input_zero_point", None)
        self.register_buffer("input_divisor", None)  # (C,) run-time smoothing: the input is multiplied by 1 / d

    def set_input_divisor(self, divisor: torch.Tensor | None) -> QuantLinear:
        """Smooth the input at run time by ``divisor`` d (in_features,) (None: no smoothing); the weight
        must already hold ``W * d`` (columns), as the recipe stores it."""
        self.input_divisor = None if divisor is None else _checked_divisor(divisor, self.in_features, "input_divisor")
        return self

    def set_scales(self, weight_scale, weight_zero_point=None, input_scale=None, input_zero_point=None) -> QuantLinear:
        self.weight_scale = weight_scale.float()
        self.weight_zero_point = None if weight_zero_point is None else weight_zero_point.float()
        self.input_scale = None if input_scale is None else input_scale.float()
        self.input_zero_point = None if input_zero_point is None else input_zero_point.float()
        return self

    def quantized_weight(self) -> torch.Tensor:
        return fake_quant_weight(self.weight, self.weight_scale, self.weight_zero_point, self.weight_bits, self.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_divisor is not None:  # the exported graph's Mul, in the input's dtype, before its QuantizeLinear
            x = x * input_reciprocal(self.input_divisor).to(x.dtype)
        if self.act_bits is not None and self.dynamic:
            x = fake_quant(x, dynamic_scale(x, self.act_bits), None, self.act_bits, True)
        elif self.act_bits is not None and self.input_scale is not None:
            scale, zp = self._of_group(self.input_scale, x), self._of_group(self.input_zero_point, x)
            x = fake_quant(x, scale, zp, self.act_bits, self.symmetric)
        return F.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _of_group(self, value: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """A per-tensor input quantity (``()``, or ``(K,)`` by timestep group) for this call: the group's
        value, or with per-row groups a ``(B, 1, ..., 1)`` column of each row's value (no host read)."""
        if value is None or value.ndim == 0:
            return value
        if isinstance(self.group, int):
            return value[self.group]
        column = value.index_select(0, self.group).reshape(-1, *([1] * (x.ndim - 1)))
        return column.to(x.dtype)  # keeps x's dtype, as a 0-dim scale does

    def extra_repr(self) -> str:
        w = number_format(self.weight_bits).name
        a = number_format(self.act_bits).name if self.act_bits is not None else "float"
        smoothed = ", input / d" if self.input_divisor is not None else ""
        return f"{self.in_features} -> {self.out_features}, {w} weights, {a} inputs, {'sym' if self.symmetric else 'asym'}{smoothed}"


# ---------------------------------------------------------------------------- run-time smoothing
def input_reciprocal(divisor: torch.Tensor) -> torch.Tensor:
    """The multiplier ``1 / d`` (C,) float32 of a run-time input divisor ``d``: the one computation that the
    calibration's working model, the simulation and the exported Mul all multiply by (bit for bit)."""
    return torch.reciprocal(divisor.detach().float())


def _checked_divisor(divisor: torch.Tensor, channels: int, what: str) -> torch.Tensor:
    d = divisor.detach().float()
    if tuple(d.shape) != (channels,) or not bool((torch.isfinite(d) & (d > 0)).all()):
        raise ArtifactError(f"{what} must be {channels} finite positive factors, got shape {tuple(d.shape)}; re-run `ditrt calibrate`")
    return d


class InputDivisor:
    """Forward pre-hook of a float Linear smoothed at run time: its input times ``1 / d``
    (:func:`input_reciprocal`), in the input's dtype. A hook, not a buffer, so the module's state dict (a
    recipe's ``model.*``) keeps the checkpoint's keys; ``copy.deepcopy`` of the model copies it."""

    def __init__(self, divisor: torch.Tensor):
        self.reciprocal = input_reciprocal(divisor)

    def __call__(self, module: nn.Module, args: tuple):
        x = args[0]
        if self.reciprocal.device != x.device:
            self.reciprocal = self.reciprocal.to(x.device)
        return (x * self.reciprocal.to(x.dtype), *args[1:])


def divide_input(linear: nn.Linear, divisor: torch.Tensor) -> None:
    """Install the run-time divide of ``linear``'s input by ``divisor`` d (C,) (an :class:`InputDivisor`
    pre-hook, run before any hook registered after it). The caller scales the weight columns by d."""
    if any(isinstance(h, InputDivisor) for h in linear._forward_pre_hooks.values()):
        raise ArtifactError("this Linear already divides its input at run time; smooth each layer once")
    linear.register_forward_pre_hook(InputDivisor(_checked_divisor(divisor, linear.in_features, "input divisor")))


def runtime_divisors(tensors: dict, recipe: Recipe | None = None) -> dict[str, torch.Tensor]:
    """Layer -> its run-time input divisor d (C,) from a recipe's ``quant.<layer>.input_divisor`` tensors.

    With ``recipe``: refuse tensors that disagree with :attr:`Recipe.runtime_smoothed` (a divisor of a
    layer the recipe does not smooth, or a smoothed layer without one), which would silently compute
    another model."""
    found = {k[len("quant.") : -len(".input_divisor")]: v for k, v in tensors.items()
             if k.startswith("quant.") and k.endswith(".input_divisor")}  # fmt: skip
    if recipe is not None and set(found) != set(recipe.runtime_smoothed):
        odd = sorted(set(found) ^ set(recipe.runtime_smoothed))[0]
        raise ArtifactError(f"recipe.json and weights.safetensors disagree on whether {odd} is smoothed at run time "
                            "(quant.<layer>.input_divisor); re-run `ditrt calibrate`")  # fmt: skip
    return found


def dynamic_scale(x: torch.Tensor, bits) -> torch.Tensor:
    """Symmetric per-sample scales (shape (N, 1, ..., 1)) from each sample's max |x|, computed every call."""
    amax = x.detach().abs().reshape(x.shape[0], -1).amax(1).clamp_min(torch.finfo(torch.float32).tiny)
    return (amax / qrange(bits)[1]).reshape(-1, *([1] * (x.ndim - 1)))


def select_timestep_group(model: nn.Module, args) -> None:
    """Forward pre-hook of a DiT with grouped activation scales: every QuantLinear uses ``t``'s group.

    ``t`` on the CPU: one host index (:func:`batch_timestep_group`, which refuses a batch mixing
    groups). Elsewhere: each row's group as a tensor on ``t``'s device (:func:`timestep_groups_of`),
    since reading ``t`` back would wait for the GPU at every sampler step."""
    t, edges = args[1], model.timestep_group_edges
    g = batch_timestep_group(t, edges) if t.device.type == "cpu" else timestep_groups_of(t, edges)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.group = g


def timestep_groups_of(t: torch.Tensor, edges) -> torch.Tensor:
    """``(B,)`` int64: the group of each timestep of ``t`` (the number of descending ``edges`` above it,
    as :func:`ditrt.contracts.recipe.timestep_group` counts in float64), computed on ``t``'s device."""
    t = t.reshape(-1).to(torch.float64)
    groups = torch.zeros(t.shape, dtype=torch.int64, device=t.device)
    for e in edges:
        groups += t < float(e)
    return groups


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def folded_float_model(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with a recipe's folded float weights (``model.*``, if any) and its run-time
    input divisors (:class:`InputDivisor` hooks): the float computation the recipe quantizes, which
    computes what the original model computes up to float rounding."""
    m = copy.deepcopy(model).eval()
    folded = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    if folded:
        m.load_state_dict(folded)
    for name, d in runtime_divisors(tensors).items():
        divide_input(m.get_submodule(name), d)
    return m


def quantized_model(model: nn.Module, recipe: Recipe, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with the recipe's folded weights and its layers simulated-quantized (a layer
    smoothed at run time with its ``input_divisor``)."""
    q = copy.deepcopy(model).eval()
    folded = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    if folded:
        q.load_state_dict(folded)
    divisors = runtime_divisors(tensors, recipe)
    for name in recipe.layers:
        lin = get_module(q, name)
        if not isinstance(lin, nn.Linear):
            raise ArtifactError(f"recipe layer {name} is not a Linear in this model; re-run `ditrt calibrate` for it")
        spec = recipe.spec  # the precision's grids (its integer widths alone do not tell INT8 from FP8)
        ql = QuantLinear(lin, weight_bits=spec.weight_fmt, act_bits=spec.act_fmt, symmetric=recipe.symmetric,
                         dynamic=recipe.dynamic_activations)  # fmt: skip
        p = f"quant.{name}."
        if p + "weight_scale" not in tensors:
            raise ArtifactError(f"recipe tensors lack {p}weight_scale; the recipe folder is incomplete, re-run `ditrt calibrate`")
        ql.set_scales(
            tensors[p + "weight_scale"], tensors.get(p + "weight_zero_point"), tensors.get(p + "input_scale"), tensors.get(p + "input_zero_point")
        )
        ql.set_input_divisor(divisors.get(name))
        set_module(q, name, ql)
    if recipe.timestep_group_edges and recipe.act_bits is not None:
        q.timestep_group_edges = tuple(recipe.timestep_group_edges)
        q.register_forward_pre_hook(select_timestep_group)
    return q


def load_quantized(recipe_dir, model: nn.Module, *, model_source: str = "the model") -> tuple[nn.Module, Recipe]:
    """Load a recipe folder onto ``model`` after checking it was made from these exact weights."""
    from ditrt.contracts.files import state_dict_hash
    from ditrt.contracts.recipe import check_recipe_matches, load_recipe

    recipe, tensors = load_recipe(recipe_dir)
    check_recipe_matches(recipe, state_dict_hash(model), model_source)
    return quantized_model(model, recipe, tensors), recipe
