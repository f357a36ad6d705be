"""The simulated quantized model's state on a device: its scales and zero points move with ``.to``,
and its timestep group is found where ``t`` lives, never read back from another device."""

import copy
import dataclasses

import pytest
import torch

from ditrt.contracts.errors import InputError
from ditrt.contracts.recipe import batch_timestep_group, timestep_group
from ditrt.contracts.spec import DiTSpec
from ditrt.models.quantized import QuantLinear, quantized_model, timestep_groups_of
from tests.conftest import TINY, random_dit
from tests.export.recipes import absmax_recipe

EDGES = (500.0,)


@pytest.fixture(scope="module")
def grouped():
    """A tiny W8A8 model with asymmetric zero points and two timestep groups of input scales."""
    torch.set_num_threads(1)
    model = random_dit(TINY)
    recipe, tensors = absmax_recipe(model, "w8a8", symmetric=False)
    recipe = dataclasses.replace(recipe, timestep_group_edges=EDGES)
    for name in recipe.layers:
        s = tensors[f"quant.{name}.input_scale"]
        tensors[f"quant.{name}.input_scale"] = torch.stack([s, 0.5 * s])
        tensors[f"quant.{name}.input_zero_point"] = torch.tensor([0.0, 2.0])
    return quantized_model(model, recipe, tensors)


def _quant_layers(model):
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


def test_scales_and_zero_points_are_buffers_that_move_with_the_model(grouped):
    names = ("weight_scale", "weight_zero_point", "input_scale", "input_zero_point")
    layer = _quant_layers(grouped)[0]
    assert {n for n, _ in layer.named_buffers()} == set(names)
    moved = _quant_layers(copy.deepcopy(grouped).to("meta"))
    assert moved and all(getattr(m, n).device.type == "meta" for m in moved for n in names)
    bare = QuantLinear(torch.nn.Linear(4, 2), weight_bits=8, act_bits=None)
    assert bare.input_scale is None and bare.to("meta").weight_scale.device.type == "meta"  # None buffers stay None


def test_on_the_meta_device_the_group_comes_from_t_without_a_read_back(grouped):
    """A meta tensor has no values: reading ``t`` back (as the CPU path does) raises there, so a call
    that succeeds on meta picked its groups on the device."""
    x, _, y = DiTSpec(TINY).sample_inputs(2, seed=3)
    t = torch.tensor([900.0, 100.0])
    with pytest.raises(NotImplementedError):
        batch_timestep_group(t.to("meta"), EDGES)
    model = copy.deepcopy(grouped).to("meta")
    with torch.no_grad():
        out = model(x.to("meta"), t.to("meta"), y.to("meta"))
    layer = _quant_layers(model)[0]
    assert out.device.type == "meta" and out.shape == (2, 8, 8, 8)
    assert isinstance(layer.group, torch.Tensor) and layer.group.device.type == "meta" and layer.group.shape == (2,)


def test_per_row_groups_on_the_device_compute_what_each_group_computes_alone(grouped):
    ts = torch.tensor([999.0, 500.0, 499.5, 0.0])
    assert timestep_groups_of(ts, EDGES).tolist() == [timestep_group(float(v), EDGES) for v in ts] == [0, 0, 1, 1]
    layer = _quant_layers(grouped)[0]
    x = torch.randn(4, 5, layer.in_features)
    with torch.no_grad():
        layer.group = timestep_groups_of(ts, EDGES)
        rows = layer(x)
        alone = []
        for i, g in enumerate(timestep_groups_of(ts, EDGES).tolist()):
            layer.group = g
            alone.append(layer(x[i : i + 1]))
    assert torch.equal(rows, torch.cat(alone))  # bit for bit: the same scale per element
    # on the CPU the whole model keeps refusing a batch that mixes groups, as the runtime's graphs do
    inputs = DiTSpec(TINY).sample_inputs(2, seed=3)
    with pytest.raises(InputError, match="mixes timesteps"), torch.no_grad():
        grouped(inputs[0], torch.tensor([900.0, 100.0]), inputs[2])
