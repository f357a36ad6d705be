"""Calibration methods as registered strategies: each owns its settings and the steps the procedure
(:func:`ditrt.calibrate.ptq.calibrate`) asks of it.

A method is a :class:`Method` with
- ``settings``: its frozen settings dataclass (its defaults are the method's defaults);
- ``default_search``: the scale search weights and activations use unless the config says otherwise;
- :meth:`Method.balance`: compute balancing factors from observed statistics and fold them into the
  working model (returns a :class:`Balanced`, or None when the method does not balance here); with
  ``config.smooth_fc2`` the balancing methods also smooth every block's fc2 with the same formula, at
  run time (:func:`ditrt.calibrate.balance.smooth_at_run_time`: fc2's input has no fold partner);
- :meth:`Method.block_sizes`: a per-layer INT4 block choice (None: the configured block everywhere);
- :meth:`Method.notes`: what the recipe should say about this method at this precision.

Adding a method = one :class:`Method` subclass and one :func:`register` call below, plus its name in
:data:`ditrt.contracts.recipe.METHODS`. The procedure holds no ``if method == ...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ditrt.contracts.errors import ConfigError
from ditrt.contracts.precisions import INT4_BLOCK_SIZES, Precision
from ditrt.contracts.recipe import METHODS
from ditrt.distributed import SINGLE, World

if TYPE_CHECKING:  # torch and the method code load when a method runs: the CLI reads this registry for its options
    import torch
    from torch import nn

    from ditrt.calibrate import balance as B
    from ditrt.diffusion.recording import CalibBatch

# ----------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class MinMaxSettings:
    """Min-max: no balancing, no search; nothing to set."""


@dataclass(frozen=True)
class SmoothQuantSettings:
    """SmoothQuant: ``alpha`` is the migration strength (0: none into the weights, 1: all; 0.5 is CSB's balance)."""

    alpha: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"smoothquant alpha must lie in [0, 1], got {self.alpha}; 0.5 is PTQ4DiT's balance")


@dataclass(frozen=True)
class PTQ4DiTSettings:
    """PTQ4DiT: CSB factors on the SSC salience; the paper's formulas have no free setting."""


@dataclass(frozen=True)
class DiTASSettings:
    """DiTAS: temporal-aggregated smoothing with a per-layer alpha search over the paper's grid."""


#: Q-DiT's fitness functions (see :class:`ditrt.calibrate.granularity.SearchSettings`)
QDIT_FITNESSES = ("psnr", "fd", "proxy")
#: Q-DiT's INT4 choice meaning "one scale per output channel" (simulation only: no TensorRT format)
QDIT_CHANNEL = 0


@dataclass(frozen=True)
class QDiTSettings:
    """Q-DiT's per-layer INT4 block search.

    ``budget``: minimum mean INT4 group size, weighted by weights (None: no budget); ``fitness``: "psnr"
    or "fd" of a small sample set (pixel models) or "proxy" (layer output error, any model);
    ``candidates``: the INT4 choices, TensorRT's blocks and :data:`QDIT_CHANNEL` (per channel, simulation only).
    """

    budget: float | None = None
    fitness: str = "psnr"
    candidates: tuple[int, ...] = INT4_BLOCK_SIZES

    def __post_init__(self):
        if self.fitness not in QDIT_FITNESSES:
            raise ConfigError(f"unknown qdit fitness {self.fitness!r}; choose one of: {', '.join(QDIT_FITNESSES)}")
        allowed = (*INT4_BLOCK_SIZES, QDIT_CHANNEL)
        if not self.candidates or any(c not in allowed for c in self.candidates):
            raise ConfigError(f"qdit candidates must be INT4 blocks {INT4_BLOCK_SIZES} or {QDIT_CHANNEL} (per channel), got {self.candidates}")
        if self.budget is not None and self.budget <= 0:
            raise ConfigError(f"qdit budget is a mean INT4 group size and must be positive, got {self.budget}")


# ----------------------------------------------------------------------------------- the procedure's view


@dataclass
class Step:
    """What the procedure hands a method: the working copy ``model`` (balanced in place), the quantized
    ``layers``, the balanceable ``targets`` among them, the recorded ``batches``, the ``precision``,
    the ``config`` (:class:`ditrt.calibrate.ptq.CalibrateConfig`), the ``device``, the torchrun ``world``
    whose ranks share the observation passes, and ``details``, the method's record that goes into
    ``recipe.details``."""

    model: nn.Module
    layers: list[str]
    targets: list[str]
    batches: list[CalibBatch]
    precision: Precision
    config: object
    device: str = "cpu"
    world: World = SINGLE
    details: dict = field(default_factory=dict)

    @property
    def settings(self):
        return self.config.settings

    @property
    def seed(self) -> int:
        return self.config.calibration.seed

    @property
    def block(self) -> int | None:
        """The configured INT4 block when this precision's weights are block-wise, else None."""
        return self.config.block_size if self.precision.weight_granularity == "block" else None


@dataclass(frozen=True)
class Balanced:
    """What balancing did: the folded ``layers``, a :class:`ditrt.calibrate.balance.BalanceReport` for each
    balanced layer (folded or smoothed at run time), and ``runtime_divisors``: ``{"blocks.<i>.mlp.fc2": d (C,)}``
    (CPU float32) of the layers smoothed at run time (``config.smooth_fc2``). Those layers' weights in the
    working model hold ``W * d`` and their input is multiplied by ``1 / d`` by a pre-hook, so the working
    model's state dict alone is *not* the float model there: the recipe records each d as
    ``quant.<layer>.input_divisor`` and lists the layer in ``runtime_smoothed``."""

    layers: tuple[str, ...]
    reports: dict  # layer -> ditrt.calibrate.balance.BalanceReport
    runtime_divisors: dict = field(default_factory=dict)  # layer -> d (C,), smoothed by a run-time multiply

    @property
    def skipped(self) -> int:
        """Channels left at d = 1 because a salience was degenerate (dead weight column or activation)."""
        return sum(r.skipped for r in self.reports.values())

    def summary(self) -> dict:
        """The ``recipe.details["balance"]`` record: counts over every balanced layer, the layers that skipped
        channels, and (only if any) the layers smoothed at run time."""
        return {
            "layers": len(self.layers),
            "channels": sum(r.channels for r in self.reports.values()),
            "skipped_channels": self.skipped,
            "per_layer": {n: r.skipped for n, r in self.reports.items() if r.skipped},
            **({"runtime_smoothed": len(self.runtime_divisors)} if self.runtime_divisors else {}),
        }


class Method:
    """A calibration method. Subclasses set ``name``, ``settings`` and override the steps they take."""

    name: str = ""
    summary: str = ""  # one line for --help
    settings: type = MinMaxSettings
    #: min-max for every method: on the built-in model (docs/results/quality.md) the MSE clip search and the
    #: output-aware search clip the rare large activations whose errors compound along the trajectory, and
    #: cost 5-12 dB of paired PSNR at 50 steps while improving the one-step error
    default_search: str = "minmax"

    def notes(self, precision: Precision) -> list[str]:
        return []

    def applies(self, precision: Precision) -> bool:
        """Whether the method's steps, and so its settings, act at ``precision`` (its notes say why not)."""
        return True

    def balance(self, step: Step) -> Balanced | None:
        return None

    def block_sizes(self, step: Step) -> dict[str, int] | None:
        return None


def _runtime_targets(step: Step) -> list[str]:
    """The layers a balancing method smooths at run time: every block's fc2 with ``config.smooth_fc2``, else none.
    (The config refuses smooth_fc2 with a method that does not balance; one that skips balancing at this
    precision skips fc2 too.)"""
    from ditrt.calibrate.balance import runtime_smoothable

    return runtime_smoothable(step.layers) if getattr(step.config, "smooth_fc2", False) else []


def _fold(step: Step, factors: dict[str, torch.Tensor], reports: dict[str, B.BalanceReport]) -> Balanced:
    """Apply ``factors`` to the working model: folded into the weights for the targets, smoothed at run time
    (:func:`ditrt.calibrate.balance.smooth_at_run_time`) for the :func:`_runtime_targets`. Every rank
    computed the same factors from the same reduced statistics; each applies rank 0's, so the ranks'
    models cannot drift apart even where a GPU kernel is not bit-reproducible from one device to another."""
    from ditrt.calibrate.balance import apply_balance, smooth_at_run_time
    from ditrt.distributed import broadcast_object

    factors = broadcast_object({n: d.detach().float().cpu() for n, d in factors.items()}, step.world)
    runtime = set(_runtime_targets(step))
    folded = {n: d for n, d in factors.items() if n not in runtime}
    divisors = {n: d for n, d in factors.items() if n in runtime}
    apply_balance(step.model, folded)
    smooth_at_run_time(step.model, divisors)
    return Balanced(tuple(folded), reports, divisors)


class _Salience(Method):
    """Balancing from the observed per-step channel maxima; ``factors(per_step (T, C), w_sal (C,))``
    gives ``(d (C,), the activation salience d came from (C,))``. Activations must be quantized: moving
    activation range into INT4 weights can only hurt."""

    def factors(self, per_step: torch.Tensor, w_sal: torch.Tensor, settings) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def notes(self, precision: Precision) -> list[str]:
        if self.applies(precision):
            return []
        return [f"{self.name}: balancing skipped, activations are not quantized at {precision.name} "
                "(moving activation range into INT4 weights can only hurt)"]  # fmt: skip

    def applies(self, precision: Precision) -> bool:
        return precision.quantizes_activations

    def balance(self, step: Step) -> Balanced | None:
        from ditrt.calibrate import balance as B
        from ditrt.calibrate.observe import observe_linear_inputs

        if not self.applies(step.precision):
            return None
        layers = step.targets + _runtime_targets(step)
        stats = observe_linear_inputs(step.model, layers, step.batches, device=step.device, seed=step.seed, world=step.world)
        factors, reports = {}, {}
        for name, st in stats.items():  # compute every factor on the unmodified model, then apply them all
            w_sal = B.weight_salience(step.model.get_submodule(name).weight.detach().float())
            factors[name], s_x = self.factors(st.channel_max_by_step(), w_sal, step.settings)
            reports[name] = B.BalanceReport.of(name, factors[name], s_x, w_sal)
        return _fold(step, factors, reports)


class MinMax(Method):
    """No balancing; min-max scales unless a search is asked for."""

    name, settings = "minmax", MinMaxSettings
    summary = "no balancing, min-max scales"


class SmoothQuant(_Salience):
    """One salience per channel: the max over every recorded step, migrated with ``alpha``."""

    name, settings = "smoothquant", SmoothQuantSettings
    summary = "SmoothQuant balancing with --alpha"

    def factors(self, per_step, w_sal, settings):
        from ditrt.calibrate import balance as B

        s_x = per_step.amax(0)
        return B.smoothquant_factors(s_x, w_sal, alpha=settings.alpha), s_x


class PTQ4DiT(_Salience):
    """CSB with Spearman-guided salience over timesteps (SSC)."""

    name, settings = "ptq4dit", PTQ4DiTSettings
    summary = "CSB+SSC balancing"

    def factors(self, per_step, w_sal, settings):
        from ditrt.calibrate import balance as B

        s_x, _, _ = B.ssc_salience(per_step, w_sal)
        return B.csb_factors(s_x, w_sal), s_x


class DiTAS(Method):
    """Smoothing with a per-layer alpha chosen by the quantized layer's output error (any precision)."""

    name, settings = "ditas", DiTASSettings
    summary = "smoothing with a per-layer alpha search"

    def balance(self, step: Step) -> Balanced | None:
        from ditrt.calibrate.ditas import LayerQuant, ditas_factors

        p, config = step.precision, step.config
        quant = LayerQuant(p.weight_fmt, p.act_fmt, p.weight_granularity, step.block, config.weight_scale_search, config.act_scale_search)
        reports: dict = {}
        layers = step.targets + _runtime_targets(step)
        factors, alphas = ditas_factors(step.model, layers, step.batches, quant, seed=step.seed, device=step.device,
                                        reports=reports, world=step.world)  # fmt: skip
        step.details["alpha"] = alphas
        return _fold(step, factors, reports)


class QDiT(Method):
    """Q-DiT's evolutionary search of each layer's INT4 block (INT8 weights are per channel: nothing to search)."""

    name, settings = "qdit", QDiTSettings
    summary = "per-layer INT4 block search (--qdit-*)"

    def applies(self, precision: Precision) -> bool:
        return not precision.weight_fmt.is_float and precision.weight_bits == 4

    def notes(self, precision: Precision) -> list[str]:
        if not self.applies(precision):
            kind = "per tensor" if precision.weight_granularity == "tensor" else "per channel"
            return [f"qdit: {precision.weight_format.upper()} weights are {kind} in TensorRT, so there is no granularity "
                    f"to search at {precision.name}"]  # fmt: skip
        return []

    def block_sizes(self, step: Step) -> dict[str, int] | None:
        from ditrt.calibrate.granularity import SearchSettings, search_granularity

        if not self.applies(step.precision):
            return None
        s = step.settings
        search = SearchSettings(budget=s.budget, fitness=s.fitness, seed=step.seed)
        choice, report = search_granularity(step.model, step.layers, step.batches, bits=step.precision.weight_bits, settings=search,
                                            candidates=s.candidates, scale_search=step.config.weight_scale_search)  # fmt: skip
        step.details["granularity_search"] = report
        return choice


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


for _m in (MinMax(), SmoothQuant(), PTQ4DiT(), DiTAS(), QDiT()):
    register(_m)
assert tuple(REGISTRY) == METHODS, f"the method registry {tuple(REGISTRY)} must list exactly ditrt.contracts.recipe.METHODS {METHODS}"


def get_method(name: str) -> Method:
    """The registered method ``name``, or :class:`ConfigError` listing the known ones."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]
