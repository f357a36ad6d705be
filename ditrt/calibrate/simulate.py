"""Simulated (fake-)quantized DiTs: what a recipe computes, in torch.

:class:`QuantLinear` replaces each quantized ``nn.Linear``: it fake-quantizes its input
(per tensor, when the recipe quantizes activations) and its weight (per output channel or
block-wise), with exactly the Q/DQ semantics the ONNX export writes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ditrt.calibrate.quantizers import fake_quant, fake_quant_weight
from ditrt.errors import ArtifactError
from ditrt.recipe import Recipe


class QuantLinear(nn.Module):
    """A Linear with fake-quantized input and weight. Scales are buffers (saved with the module)."""

    def __init__(self, linear: nn.Linear, *, weight_bits: int, act_bits: int | None, symmetric: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.weight_bits, self.act_bits, self.symmetric = weight_bits, act_bits, symmetric
        self.register_buffer("weight_scale", torch.ones(self.out_features))
        self.weight_zero_point: torch.Tensor | None = None
        self.input_scale: torch.Tensor | None = None
        self.input_zero_point: torch.Tensor | None = None

    def set_scales(self, weight_scale, weight_zero_point=None, input_scale=None, input_zero_point=None) -> QuantLinear:
        self.weight_scale = weight_scale.float()
        self.weight_zero_point = None if weight_zero_point is None else weight_zero_point.float()
        self.input_scale = None if input_scale is None else input_scale.float()
        self.input_zero_point = None if input_zero_point is None else input_zero_point.float()
        return self

    def quantized_weight(self) -> torch.Tensor:
        return fake_quant_weight(self.weight, self.weight_scale, self.weight_zero_point, self.weight_bits, self.symmetric)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None and self.input_scale is not None:
            x = fake_quant(x, self.input_scale, self.input_zero_point, self.act_bits, self.symmetric)
        return F.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        a = f"a{self.act_bits}" if self.act_bits else "a16"
        return f"{self.in_features} -> {self.out_features}, w{self.weight_bits}{a}, {'sym' if self.symmetric else 'asym'}"


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantized_model(model: nn.Module, recipe: Recipe, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with the recipe's folded weights and its layers simulated-quantized."""
    q = copy.deepcopy(model).eval()
    folded = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    if folded:
        q.load_state_dict(folded)
    for name in recipe.layers:
        lin = get_module(q, name)
        if not isinstance(lin, nn.Linear):
            raise ArtifactError(f"recipe layer {name} is not a Linear in this model; re-run `ditrt calibrate` for it")
        ql = QuantLinear(lin, weight_bits=recipe.weight_bits, act_bits=recipe.act_bits, symmetric=recipe.symmetric)
        p = f"quant.{name}."
        if p + "weight_scale" not in tensors:
            raise ArtifactError(f"recipe tensors lack {p}weight_scale; the recipe folder is incomplete, re-run `ditrt calibrate`")
        ql.set_scales(
            tensors[p + "weight_scale"], tensors.get(p + "weight_zero_point"), tensors.get(p + "input_scale"), tensors.get(p + "input_zero_point")
        )
        set_module(q, name, ql)
    return q


def load_quantized(recipe_dir, model: nn.Module, *, model_source: str = "the model") -> tuple[nn.Module, Recipe]:
    """Load a recipe folder onto ``model`` after checking it was made from these exact weights."""
    from ditrt.models.checkpoints import state_dict_hash
    from ditrt.recipe import check_recipe_matches, load_recipe

    recipe, tensors = load_recipe(recipe_dir)
    check_recipe_matches(recipe, state_dict_hash(model), model_source)
    return quantized_model(model, recipe, tensors), recipe
