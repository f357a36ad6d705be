import copy
import itertools
import math

import pytest
import torch
from torch import nn

from ditrt.calibrate import granularity as G
from ditrt.calibrate.granularity import CHANNEL, SearchSettings, allowed_choices, mean_group_size, scale_count, search_granularity
from ditrt.calibrate.ptq import quantized_layers
from ditrt.calibrate.scale_search import weight_scale
from ditrt.contracts.errors import ConfigError
from ditrt.contracts.quantizers import fake_quant_weight
from ditrt.models.quantized import QuantLinear, set_module
from tests.conftest import TINY, random_dit


@pytest.fixture(scope="module")
def layers(model):
    return quantized_layers(model)


def shapes_of(model, layers):
    return {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in layers}


def largest(shapes, bits=4, candidates=(64, 128, CHANNEL)):
    """Every layer at its largest allowed group."""
    return {n: allowed_choices(i, bits, candidates)[-1] for n, (_, i) in shapes.items()}


def test_allowed_choices_scale_counts_and_mean_group_size():
    assert allowed_choices(192, 4) == (64, CHANNEL)  # 128 does not divide 192
    assert allowed_choices(768, 4) == (64, 128, CHANNEL)
    assert allowed_choices(768, 4, (64, 128)) == (64, 128)
    assert allowed_choices(768, 8) == (CHANNEL,)
    assert (
        scale_count(192, 768, 64) == 192 * 12 and scale_count(192, 768, 128) == 192 * 6 and scale_count(192, 768, CHANNEL) == 192
    )
    with pytest.raises(ConfigError):
        scale_count(192, 192, 128)
    # weighted by the number of weights: a (10, 128) layer at block 64 and a (10, 256) layer per channel
    assert mean_group_size({"a": 64, "b": CHANNEL}, {"a": (10, 128), "b": (10, 256)}) == pytest.approx(
        (1280 * 64 + 2560 * 256) / 3840
    )


@pytest.mark.parametrize("candidates", [(64, 128, CHANNEL), (64, 128)])
def test_search_respects_the_budget_and_the_allowed_block_sizes(model, batches, layers, candidates):
    shapes = shapes_of(model, layers)
    lo, hi = mean_group_size({n: 64 for n in layers}, shapes), mean_group_size(largest(shapes, candidates=candidates), shapes)
    budget = (lo + hi) / 2
    genome, report = search_granularity(
        model, layers, batches, bits=4, settings=SearchSettings(fitness="proxy", budget=budget), candidates=candidates
    )
    assert list(genome) == layers
    for name, choice in genome.items():
        in_f = shapes[name][1]
        assert choice in allowed_choices(in_f, 4, candidates)
        assert choice == CHANNEL or in_f % choice == 0
    assert mean_group_size(genome, shapes) >= budget and report["mean_group_size"] == mean_group_size(genome, shapes)
    assert report["scale_count"] == sum(scale_count(*shapes[n], c) for n, c in genome.items())
    assert len(report["history"]) == SearchSettings().generations + 1 and report["history"] == sorted(
        report["history"], reverse=True
    )
    if CHANNEL not in candidates:
        assert CHANNEL not in genome.values()
        assert all(genome[n] == 64 for n in layers if not n.endswith("fc2"))  # only fc2 (in 768) can take 128
        assert sum(genome[n] == 128 for n in layers if n.endswith("fc2")) >= 3  # what the budget demands


class Branches(nn.Module):
    """Three Linears (256 -> 32) reading the same input, so each layer's proxy error can be computed from it.

    a and b have outlier input columns (fine blocks help); c's weights are multiples of 0.1 with a
    0.7 in every row's first block and at most 0.3 elsewhere: exact on the per-channel grid (step
    0.1), off the grid of every other 64- or 128-block (step 0.3 / 7). The optimum is (64, 64, CHANNEL)
    in all likelihood, which is none of the uniform genomes the search starts from.
    """

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b, self.c = nn.Linear(256, 32), nn.Linear(256, 32), nn.Linear(256, 32)
        with torch.no_grad():
            for lin, outliers in ((self.a, [3]), (self.b, [70, 200])):
                lin.weight.copy_(torch.randn(32, 256, generator=g) * 0.1)
                lin.weight[:, outliers] *= 8
            c = torch.randint(-3, 4, (32, 256), generator=g).float()
            c[:, 0] = 7
            self.c.weight.copy_(c * 0.1)

    def forward(self, x, t, y):
        return self.a(x) + self.b(x) + self.c(x)


def brute_force(model, x, budget):
    """The best genome of (a, b, c) under the budget, by enumerating all 27 and computing the error directly."""
    names, shapes = ["a", "b", "c"], {n: (32, 256) for n in "abc"}

    def error(name, choice):
        w = model.get_submodule(name).weight.detach()
        gran, block = ("channel", None) if choice == CHANNEL else ("block", choice)
        wq = fake_quant_weight(w, weight_scale(w, 4, granularity=gran, block_size=block)[0], None, 4)
        return float((x @ (wq - w).T).square().mean())

    feasible = [
        g for g in itertools.product((64, 128, CHANNEL), repeat=3) if mean_group_size(dict(zip(names, g)), shapes) >= budget
    ]
    scored = {g: sum(error(n, c) for n, c in zip(names, g)) for g in feasible}
    best = min(scored, key=scored.get)
    return dict(zip(names, best)), scored[best], len(feasible)


@pytest.mark.parametrize("budget", [None, 150.0])
def test_search_finds_the_brute_force_optimum_and_never_evaluates_a_genome_twice(monkeypatch, budget):
    model = Branches().eval()
    x = torch.randn(2, 64, 256, generator=torch.Generator().manual_seed(1))  # 128 rows: all of them are captured
    calls = []
    real = G._proxy_fitness

    def counting(*args):
        fitness = real(*args)
        return lambda genome: calls.append(genome) or fitness(genome)

    monkeypatch.setattr(G, "_proxy_fitness", counting)
    settings = SearchSettings(population=4, keep=2, generations=8, mutation=0.3, fitness="proxy", budget=budget)
    batch = (x, torch.zeros(2), torch.zeros(2, dtype=torch.long))
    genome, report = search_granularity(model, ["a", "b", "c"], [batch], bits=4, settings=settings)
    best, best_error, feasible = brute_force(model, x.reshape(-1, 256), budget or 0.0)
    assert genome == best and report["best_fitness"] == pytest.approx(best_error, rel=1e-5)
    assert genome["c"] == CHANNEL  # the optimum is not simply the finest grid
    # Without a budget the 27 genomes outnumber the 20 slots (so the search did not enumerate); with it only 10
    # are feasible, fewer than the slots: only the cache keeps every genome to a single evaluation.
    slots = settings.population + settings.generations * (settings.population - settings.keep)
    assert (feasible < slots) == (budget is not None)
    assert len(calls) == len(set(calls)) == report["evaluations"] <= min(feasible, slots)


def test_impossible_budget_is_a_config_error_and_int8_is_per_channel(model, batches, layers):
    shapes = shapes_of(model, layers)
    too_big = mean_group_size(largest(shapes), shapes) + 1
    with pytest.raises(ConfigError, match="budget"):
        search_granularity(model, layers, batches, bits=4, settings=SearchSettings(fitness="proxy", budget=too_big))
    genome, report = search_granularity(model, layers, batches, bits=8, settings=SearchSettings(fitness="proxy"))
    assert set(genome.values()) == {CHANNEL} and report["evaluations"] == 1


def test_fd_fitness_with_tiny_settings(model, batches, layers):
    settings = SearchSettings(population=3, generations=1, keep=2, fitness_samples=4, fitness_steps="5", budget=100.0)
    genome, report = search_granularity(model, layers, batches, bits=4, settings=settings)
    assert len(report["history"]) == 2 and all(math.isfinite(h) for h in report["history"])
    assert mean_group_size(genome, shapes_of(model, layers)) >= 100.0
    built = []

    def make_quantized(weight_scales):
        """The caller's simulated model: here weight-only, recording the scale shapes it was given."""
        built.append({n: tuple(s.shape) for n, s in weight_scales.items()})
        q = copy.deepcopy(model)
        for name, s in weight_scales.items():
            set_module(q, name, QuantLinear(model.get_submodule(name), weight_bits=4, act_bits=None).set_scales(s))
        return q

    genome2, report2 = search_granularity(model, layers, batches, bits=4, settings=settings, make_quantized=make_quantized)
    assert genome2 == genome and report2["history"] == pytest.approx(report["history"])  # same search, same fitness
    assert len(built) == report2["evaluations"]
    assert built[0]["blocks.0.mlp.fc2"] in ((192, 768 // 64), (192, 768 // 128), (192,))


def test_fd_fitness_refuses_latent_models():
    with pytest.raises(ConfigError, match="proxy"):
        search_granularity(random_dit(TINY), ["blocks.0.attn.qkv"], [], bits=4, settings=SearchSettings(fitness="fd"))


def test_psnr_fitness_scores_minus_the_paired_psnr_against_the_float_samples(model, batches, layers):
    settings = SearchSettings(population=2, generations=0, keep=1, fitness="psnr", fitness_samples=4, fitness_steps="5")
    genome, report = search_granularity(model, layers, batches, bits=4, settings=settings)
    # a quantized model differs from the float one, so the paired PSNR is finite and positive
    assert math.isfinite(report["best_fitness"]) and report["best_fitness"] < 0
