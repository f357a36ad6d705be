"""Q-DiT's granularity allocation, restricted to what TensorRT runs: a weight quantization
granularity per Linear, found by an evolutionary search under a size budget.

Q-DiT gives every Linear its own group size along the input dimension and searches the
combination with an evolutionary algorithm whose fitness is the FID of generated images, under a
budget on the mean group size. TensorRT's INT8 weights are per output channel only and its INT4
weights are block-wise with block 64 or 128 only, so the deployable search space is
{64, 128} per INT4 layer (per-channel INT4 is simulated here for comparison, but no TensorRT format).

A *genome* is a choice per layer: :data:`CHANNEL` or a block size that divides the layer's
``in_features``. The search:

- starts from the uniform genomes (every layer at its smallest / largest group, every layer at one
  candidate where it can) plus random ones;
- repairs any genome under the budget by moving random layers to their next larger group until it
  meets the budget (no genome is ever evaluated while over budget);
- each generation keeps the ``keep`` best, and fills the population with children made by uniform
  per-layer crossover of two kept parents and per-gene mutation;
- evaluates each distinct genome once (fitness is cached by genome).

The built-in digits model (hidden 192, fc2 in_features 768) has a small search space at INT4:
qkv, proj and fc1 (in 192) allow only block 64 (and per-channel when allowed; 128 does not divide
192), fc2 allows 64 and 128 (and per-channel). With the deployable candidates (64, 128) only the
six fc2 layers have a choice: 64 genomes in all.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ditrt.calibrate.observe import capture_layer_inputs
from ditrt.calibrate.scale_search import weight_scale
from ditrt.contracts.errors import ConfigError, InputError
from ditrt.contracts.precisions import INT4_BLOCK_SIZES
from ditrt.contracts.quantizers import fake_quant_weight
from ditrt.diffusion.recording import CalibBatch
from ditrt.models.quantized import QuantLinear, set_module

#: The per-channel choice (a scale per output channel); every other choice is an INT4 block size along the input dim.
CHANNEL = 0
#: TensorRT's INT4 block sizes: pass these as ``candidates`` for a deployable recipe.
DEPLOYABLE_INT4 = INT4_BLOCK_SIZES
#: Token rows captured per layer for the "proxy" fitness (spread evenly over the calibration batches).
PROXY_ROWS = 1024
#: Attempts at drawing a genome not evaluated yet before accepting a repeat (small spaces run out).
FRESH_TRIES = 20
FITNESSES = ("fd", "psnr", "proxy")

Genome = tuple[int, ...]  # one choice per layer, in the order of the searched layers


def group_size(in_features: int, choice: int) -> int:
    """How many weights share one scale: the block size, or the whole input row per channel."""
    return in_features if choice == CHANNEL else choice


def allowed_choices(in_features: int, bits: int, candidates: Sequence[int] = (64, 128, CHANNEL)) -> tuple[int, ...]:
    """The granularities a layer may use, smallest group first.

    INT8 weights: only ``(CHANNEL,)`` (TensorRT's INT8 weights are per output channel). Fewer bits
    (INT4): the candidate block sizes that divide ``in_features``, plus CHANNEL if it is a candidate.
    TensorRT runs INT4 only block-wise with block 64 or 128: per-channel INT4 (and any other block
    size) is a simulation-only setting, so deployable recipes pass ``candidates=DEPLOYABLE_INT4``.
    """
    if not 2 <= bits <= 8:
        raise ConfigError(f"weight bits must be between 2 and 8 (8 or 4 for TensorRT), got {bits}")
    bad = [c for c in candidates if not isinstance(c, int) or c < 0]
    if bad:
        raise ConfigError(f"granularity candidates must be block sizes > 0 or CHANNEL (0), got {bad[0]!r}")
    if bits == 8:
        return (CHANNEL,)
    allowed = {c for c in candidates if c == CHANNEL or in_features % c == 0}
    return tuple(sorted(allowed, key=lambda c: (group_size(in_features, c), c != CHANNEL)))


def scale_count(out_features: int, in_features: int, choice: int) -> int:
    """Scales stored for a Linear (out, in): ``out`` per channel, ``out * in / block`` block-wise."""
    if choice != CHANNEL and (choice <= 0 or in_features % choice):
        raise ConfigError(f"block size {choice} does not divide the input dimension {in_features}; pick a divisor or CHANNEL")
    return out_features if choice == CHANNEL else out_features * (in_features // choice)


def mean_group_size(genome: dict[str, int], layer_shapes: dict[str, tuple[int, int]]) -> float:
    """Q-DiT's budget measure: ``sum_l n_l g_l / sum_l n_l`` over the layers of ``genome``.

    ``n_l = out_l * in_l`` is the number of weights of layer l and ``g_l`` its group size (the block
    size, or ``in_l`` per channel). Larger means fewer scales: a layer stores ``n_l / g_l`` of them
    (use :func:`scale_count` for the exact count, which this arithmetic mean only bounds).
    """
    sizes = [(layer_shapes[name], choice) for name, choice in genome.items()]
    total = sum(o * i for (o, i), _ in sizes)
    if not total:
        raise InputError("mean group size of no layers; search at least one Linear")
    return sum(o * i * group_size(i, c) for (o, i), c in sizes) / total


@dataclass(frozen=True)
class SearchSettings:
    """The evolutionary search (Q-DiT used population 50, 10 rounds, keep 10, mutation 0.1).

    ``generations``: breeding rounds after the initial population (history has ``generations + 1``
    entries). ``budget``: the minimum :func:`mean_group_size` (larger groups = fewer scales =
    smaller); None: no budget. ``fitness``: "fd" samples ``fitness_samples`` images with
    ``fitness_steps`` and takes their FD to the real digits (pixel models like the built-in one);
    "psnr" samples the same way and scores minus the paired PSNR against the float model's samples
    (same seeds): on the built-in model FD of 32 samples moves by ~16 with the seeds while the block
    choice moves it by < 0.5, so FD cannot rank genomes there and the paired score can;
    "proxy" sums the layers' output MSE on captured calibration inputs (cheap, for big models).
    """

    population: int = 8
    generations: int = 4
    keep: int = 4
    mutation: float = 0.1
    seed: int = 0
    budget: float | None = None
    fitness: str = "fd"
    fitness_samples: int = 32
    fitness_steps: str = "25"

    def __post_init__(self):
        if self.fitness not in FITNESSES:
            raise ConfigError(f"unknown granularity fitness {self.fitness!r}; choose one of: {', '.join(FITNESSES)}")
        if self.population < 1 or not 1 <= self.keep <= self.population or self.generations < 0:
            raise ConfigError(f"search needs population >= 1, 1 <= keep <= population and generations >= 0, got {self}")
        if not 0.0 <= self.mutation <= 1.0:
            raise ConfigError(f"mutation is a per-gene probability in [0, 1], got {self.mutation}")
        if self.fitness_samples < 2:
            raise ConfigError(f"the FD fitness needs at least 2 samples, got {self.fitness_samples}")


class _Space:
    """The genomes allowed for ``layers``: options per layer (smallest group first) and the budget."""

    def __init__(
        self, layers: list[str], shapes: dict[str, tuple[int, int]], bits: int, candidates: Sequence[int], budget: float | None
    ):
        self.layers, self.shapes, self.budget = layers, shapes, budget
        self.options = [allowed_choices(shapes[n][1], bits, candidates) for n in layers]
        for name, opts in zip(layers, self.options):
            if not opts:
                raise ConfigError(f"{name} (in_features {shapes[name][1]}) allows none of the candidates {tuple(candidates)}; "
                                  "add a block size that divides it, or leave the layer out")  # fmt: skip
        largest = self.mean(tuple(o[-1] for o in self.options))
        if budget is not None and largest < budget:
            raise ConfigError(f"no genome meets the mean group size budget {budget:g}: the largest groups give {largest:.4g}; "
                              "lower the budget or allow larger groups")  # fmt: skip

    def mean(self, genome: Genome) -> float:
        return mean_group_size(dict(zip(self.layers, genome)), self.shapes)

    def meets(self, genome: Genome) -> bool:
        return self.budget is None or self.mean(genome) >= self.budget

    def uniform(self, candidates: Sequence[int]) -> list[Genome]:
        """All-smallest, all-largest, then each candidate wherever a layer allows it (else the smallest)."""
        genomes = [tuple(o[0] for o in self.options), tuple(o[-1] for o in self.options)]
        genomes += [tuple(c if c in o else o[0] for o in self.options) for c in candidates]
        return list(dict.fromkeys(genomes))

    def random(self, rng: random.Random) -> Genome:
        return tuple(rng.choice(o) for o in self.options)

    def crossover(self, a: Genome, b: Genome, rng: random.Random) -> Genome:
        return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))

    def mutate(self, genome: Genome, p: float, rng: random.Random) -> Genome:
        """Each gene, with probability ``p``, becomes another allowed choice of its layer."""
        return tuple(
            rng.choice([c for c in o if c != g]) if len(o) > 1 and rng.random() < p else g for g, o in zip(genome, self.options)
        )

    def repair(self, genome: Genome, rng: random.Random) -> Genome:
        """Move random layers one step toward larger groups until the genome meets the budget."""
        genome = list(genome)
        while not self.meets(tuple(genome)):
            i = rng.choice([i for i, (g, o) in enumerate(zip(genome, self.options)) if g != o[-1]])
            genome[i] = self.options[i][self.options[i].index(genome[i]) + 1]
        return tuple(genome)


class _WeightScales:
    """Symmetric weight scales of each (layer, choice), computed once: fitness evaluations share them."""

    def __init__(self, model: nn.Module, bits: int, search: str):
        self.model, self.bits, self.search = model, bits, search
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def weight(self, name: str) -> torch.Tensor:
        return self.model.get_submodule(name).weight.detach().float()

    def get(self, name: str, choice: int) -> torch.Tensor:
        key = (name, choice)
        if key not in self._cache:
            granularity = "channel" if choice == CHANNEL else "block"
            block = None if choice == CHANNEL else choice
            self._cache[key] = weight_scale(
                self.weight(name), self.bits, granularity=granularity, block_size=block, search=self.search
            )[0]
        return self._cache[key]

    def for_genome(self, layers: list[str], genome: Genome) -> dict[str, torch.Tensor]:
        return {n: self.get(n, c) for n, c in zip(layers, genome)}


def _layer_shapes(model: nn.Module, layers: list[str]) -> dict[str, tuple[int, int]]:
    shapes = {}
    for name in layers:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise ConfigError(f"{name} is not an nn.Linear; search the float (unquantized) model's Linear layers")
        shapes[name] = (lin.out_features, lin.in_features)
    return shapes


def capture_rows(model: nn.Module, layers: list[str], batches: list[CalibBatch], *, rows: int = PROXY_ROWS, seed: int = 0):
    """About ``rows`` random token rows (n, in_features) of each layer's input, spread evenly over ``batches``."""
    if not batches:
        raise InputError("no calibration batches to capture layer inputs from; record them with record_calibration_inputs")
    per_batch = max(1, math.ceil(rows / len(batches)))
    device = next(model.parameters()).device
    captured = capture_layer_inputs(model, layers, batches, tokens_per_batch=per_batch, seed=seed, device=device)
    return {n: c.rows for n, c in captured.items()}


def _proxy_fitness(model, layers, batches, scales: _WeightScales) -> Callable[[Genome], float]:
    """Summed output MSE of each weight-quantized layer against float, on its captured inputs.

    The error of a (layer, choice) does not depend on the other layers, so it is computed once (the
    search is then an additive knapsack). The MSEs are not normalised: layers with large outputs weigh more.
    """
    inputs = capture_rows(model, layers, batches)
    errors: dict[tuple[str, int], float] = {}

    def layer_error(name: str, choice: int) -> float:
        if (name, choice) not in errors:
            w = scales.weight(name)
            dw = fake_quant_weight(w, scales.get(name, choice), None, scales.bits) - w
            errors[name, choice] = float((inputs[name].to(w.device) @ dw.T).square().mean())
        return errors[name, choice]

    return lambda genome: sum(layer_error(n, c) for n, c in zip(layers, genome))


def _weight_only_builder(model: nn.Module, layers: list[str], bits: int) -> Callable[[dict], nn.Module]:
    """One copy of ``model`` with weight-only QuantLinears whose scales each call replaces."""
    q = copy.deepcopy(model).eval()
    for name in layers:
        set_module(q, name, QuantLinear(q.get_submodule(name), weight_bits=bits, act_bits=None))

    def build(weight_scales: dict[str, torch.Tensor]) -> nn.Module:
        for name, s in weight_scales.items():
            q.get_submodule(name).set_scales(s)
        return q

    return build


def _fd_fitness(
    model, layers, bits, scales: _WeightScales, settings: SearchSettings, make_quantized
) -> Callable[[Genome], float]:
    """FD to the real digits of ``fitness_samples`` images (labels i % classes, seeds 0..) from the quantized model,
    or with ``settings.fitness == "psnr"`` minus their paired PSNR against the float model's images."""
    from ditrt.diffusion.sample_set import generate
    from ditrt.diffusion.sampler import SamplerConfig
    from ditrt.models.builtin import is_pixel_model
    from ditrt.quality.metrics import fd_to_real, paired_psnr

    if getattr(model, "config", None) is None or not is_pixel_model(model):
        raise ConfigError("the 'fd' granularity fitness needs a pixel-space model like the built-in digits DiT (1x8x8); "
                          "use fitness 'proxy' for other models")  # fmt: skip
    cfg = model.config
    sampler = SamplerConfig(steps=settings.fitness_steps, cfg_scale=1.5, clip_denoised=True)
    n = settings.fitness_samples
    labels, seeds = [i % cfg.num_classes for i in range(n)], list(range(n))
    build = make_quantized or _weight_only_builder(model, layers, bits)
    device = next(model.parameters()).device

    def images_of(m):
        shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        return generate(m, sampler, labels, seeds, num_classes=cfg.num_classes, image_shape=shape, device=device)

    reference = images_of(model) if settings.fitness == "psnr" else None

    def fitness(genome: Genome) -> float:
        images = images_of(build(scales.for_genome(layers, genome)))
        return -paired_psnr(reference, images) if reference is not None else fd_to_real(images)

    return fitness


def _fresh(make: Callable[[], Genome], seen: Collection[Genome]) -> Genome:
    """A genome from ``make`` not in ``seen``, if one turns up within :data:`FRESH_TRIES` draws."""
    for _ in range(FRESH_TRIES):
        genome = make()
        if genome not in seen:
            return genome
    return genome


def _evolve(
    space: _Space, fitness: Callable[[Genome], float], settings: SearchSettings, candidates: Sequence[int], progress: bool
):
    """The search itself: returns (best genome, best fitness per generation, fitness per evaluated genome)."""
    rng = random.Random(settings.seed)
    cache: dict[Genome, float] = {}

    def evaluate(genome: Genome) -> float:
        if genome not in cache:
            value = float(fitness(genome))
            cache[genome] = value if math.isfinite(value) else math.inf  # NaN would break the ranking
        return cache[genome]

    population = list(dict.fromkeys(space.repair(g, rng) for g in space.uniform(candidates)))[: settings.population]
    while len(population) < settings.population:
        population.append(_fresh(lambda: space.repair(space.random(rng), rng), population))
    parents = sorted(dict.fromkeys(population), key=evaluate)[: settings.keep]
    history = [min(cache.values())]
    rounds = range(settings.generations)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc=f"granularity search ({settings.fitness})", unit="generation")
    for _ in rounds:
        make_child = partial(_child, space, parents, settings, rng)
        children = [_fresh(make_child, cache) for _ in range(settings.population - len(parents))]
        parents = sorted(dict.fromkeys(parents + children), key=evaluate)[: settings.keep]
        history.append(min(cache.values()))
        if progress:
            rounds.set_postfix(best=f"{history[-1]:.4g}", evaluated=len(cache))
    return min(cache, key=cache.get), history, cache


def _child(space: _Space, parents: list[Genome], settings: SearchSettings, rng: random.Random) -> Genome:
    """Uniform crossover of two random parents, per-gene mutation, then repair to the budget."""
    a, b = rng.choice(parents), rng.choice(parents)
    return space.repair(space.mutate(space.crossover(a, b, rng), settings.mutation, rng), rng)


def search_granularity(
    model: nn.Module,
    layers: list[str],
    batches: list[CalibBatch],
    *,
    bits: int,
    settings: SearchSettings = SearchSettings(),
    candidates: Sequence[int] = (64, 128, CHANNEL),
    scale_search: str = "minmax",
    make_quantized: Callable[[dict[str, torch.Tensor]], nn.Module] | None = None,
    progress: bool = False,
) -> tuple[dict[str, int], dict]:
    """The best granularity per layer under ``settings.budget``: ``({layer: choice}, report)``.

    ``model``: the float model whose weights get quantized (already balanced/folded if the method
    does that); it is not modified. Weight scales are symmetric, ``bits`` wide, found with
    ``scale_search``. ``make_quantized(weight_scales) -> nn.Module``: for the "fd" fitness, builds the
    full simulated model from ``{layer: scale}`` (``(out,)`` per channel, ``(out, in // block)``
    block-wise), e.g. to add activation quantization; by default the model is weight-only quantized.
    ``batches``: calibration inputs, used by the "proxy" fitness only. ``candidates=DEPLOYABLE_INT4``
    for a recipe TensorRT can run. The report holds ``history`` (best fitness per generation),
    ``evaluations`` (distinct genomes evaluated), ``budget``, ``mean_group_size`` and ``scale_count``
    of the result, its ``best_fitness``, the ``fitness`` kind and ``seconds``.
    """
    start = time.perf_counter()
    shapes = _layer_shapes(model, layers)
    space = _Space(layers, shapes, bits, candidates, settings.budget)
    scales = _WeightScales(model, bits, scale_search)
    if settings.fitness in ("fd", "psnr"):
        fitness = _fd_fitness(model, layers, bits, scales, settings, make_quantized)
    else:
        fitness = _proxy_fitness(model, layers, batches, scales)
    best, history, cache = _evolve(space, fitness, settings, candidates, progress)
    genome = dict(zip(layers, best))
    report = {
        "fitness": settings.fitness,
        "history": history,
        "evaluations": len(cache),
        "budget": settings.budget,
        "mean_group_size": mean_group_size(genome, shapes),
        "scale_count": sum(scale_count(*shapes[n], c) for n, c in genome.items()),
        "best_fitness": cache[best],
        "seconds": time.perf_counter() - start,
    }
    return genome, report
