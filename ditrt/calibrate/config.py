"""How to calibrate: :class:`CalibrateConfig` (the scale searches it names are :data:`ditrt.contracts.recipe.SEARCHES`).

Free of torch at import, like :mod:`ditrt.calibrate.methods`, so the command line builds its options
from these dataclasses without loading the calibration code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ditrt.calibrate.methods import REGISTRY, Method, get_method
from ditrt.contracts.errors import ConfigError
from ditrt.contracts.precisions import INT4_BLOCK_SIZES, get_precision
from ditrt.contracts.recipe import SEARCHES, WEIGHT_ROUNDINGS, CalibrationSettings

#: Why a float-grid (FP8) recipe is not reconstructed: AdaRound learns a choice between floor and floor + 1
#: of an integer grid and LSQ steps an integer grid; neither is written for E4M3's uneven spacing.
RECONSTRUCT_FLOAT = ("block reconstruction learns roundings on integer grids only, not on FP8's float grid; "
                     "drop --reconstruct at fp8 (--weights gptq rounds onto the FP8 grid)")


@dataclass(frozen=True)
class CalibrateConfig:
    """How to calibrate. ``method_settings``: the method's settings dataclass (e.g.
    :class:`ditrt.calibrate.methods.SmoothQuantSettings`), None for its defaults. ``weight_search`` and
    ``act_search``: the scale search of weights and of activations (:data:`SEARCHES`), None for the
    method's default (min-max for ``minmax``, the MSE clip search otherwise)."""

    method: str = "ptq4dit"
    precision: str = "w8a8"
    method_settings: object | None = None
    weight_search: str | None = None
    act_search: str | None = None
    quantize_all: bool = False  # also embedders, adaLN and the final layer (the paper's setting)
    symmetric: bool = True  # False: asymmetric, simulation only
    block_size: int = 64  # INT4 block along the input dimension (w4a16); qdit searches it per layer
    timestep_groups: int = 1  # K activation-scale groups over the sampling trajectory (one graph each)
    dynamic_activations: bool = False  # per-sample activation scales at run time (simulation only)
    reconstruct: bool = False  # BRECQ/AdaRound block reconstruction after the scales
    reconstruct_iters: int | None = None  # per block; None: ReconstructSettings' default
    weights: str | None = None  # weight rounding (WEIGHT_ROUNDINGS): rtn or gptq; None: the precision's default_weights
    smooth_fc2: bool = False  # balancing methods also smooth fc2, by a run-time per-channel Mul on the GELU output
    min_psnr: float | None = None  # leave the most sensitive layers in float until the paired probe reaches this PSNR
    max_float_layers: int | None = None  # at most this many layers left in float (alone: exactly the N most sensitive)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)

    def __post_init__(self):
        strategy = get_method(self.method)
        p = get_precision(self.precision)
        if self.method_settings is not None and not isinstance(self.method_settings, strategy.settings):
            raise ConfigError(
                f"method {self.method} takes {strategy.settings.__name__}, got {type(self.method_settings).__name__}; "
                f"pass {strategy.settings.__name__}(...) or None for its defaults"
            )
        if self.block_size not in INT4_BLOCK_SIZES:
            raise ConfigError(f"INT4 block size must be 64 or 128 (TensorRT's INT4 formats), got {self.block_size}")
        for what, search in (("weight", self.weight_search), ("activation", self.act_search)):
            if search is not None and search not in SEARCHES:
                raise ConfigError(f"{what} scale search must be one of {', '.join(SEARCHES)}, got {search!r}")
        c = self.calibration
        if c.timesteps < 1 or c.samples < 1:
            raise ConfigError(f"calibration needs at least 1 recorded timestep and 1 sample, got {c.timesteps} and {c.samples}")
        if self.timestep_groups < 1 or self.timestep_groups > c.timesteps:
            raise ConfigError(f"timestep groups must be between 1 and the {c.timesteps} recorded timesteps, got {self.timestep_groups}")
        if not p.quantizes_activations and (self.timestep_groups > 1 or self.dynamic_activations):
            what = "timestep groups" if self.timestep_groups > 1 else "dynamic activations"
            raise ConfigError(f"{what} set activation scales, but {p.name} does not quantize activations; drop the option or use a precision that does")
        if not self.symmetric and "output" in (self.act_search, self.weight_search, self.strategy.default_search):
            raise ConfigError("the output-aware activation search is symmetric only; pass --act-search mse (or minmax) with --asymmetric")
        if self.smooth_fc2 and type(self.strategy).balance is Method.balance:
            raise ConfigError(f"--smooth-fc2 smooths with a balancing method's factors, and {self.method} does not balance; "
                              "use smoothquant, ptq4dit or ditas")  # fmt: skip
        if self.smooth_fc2 and not self.strategy.applies(p):
            raise ConfigError(f"--smooth-fc2 smooths with {self.method}'s balancing factors, which {self.method} does not compute at {p.name} "
                              "(its activations are not quantized); drop --smooth-fc2, or use ditas, which smooths at every precision")  # fmt: skip
        if p.weight_fmt.is_float and self.reconstruct:
            raise ConfigError(RECONSTRUCT_FLOAT)
        if p.weight_fmt.is_float and not self.symmetric:
            raise ConfigError(f"{p.name} has no zero points (FP8 quantizers are symmetric); drop --asymmetric")
        if self.smooth_fc2 and self.reconstruct:
            raise ConfigError("--smooth-fc2 with --reconstruct is not supported yet (reconstruction does not learn through the run-time divisor); drop one")
        if self.weights is not None and self.weights not in WEIGHT_ROUNDINGS:
            raise ConfigError(f"weight rounding must be one of {', '.join(WEIGHT_ROUNDINGS)}, got {self.weights!r}")
        if self.min_psnr is not None and not (0 < self.min_psnr < 200):
            raise ConfigError(f"--min-psnr is a paired PSNR in dB and must lie in (0, 200), got {self.min_psnr}")
        if self.max_float_layers is not None and self.max_float_layers < 0:
            raise ConfigError(f"--max-float-layers must be 0 or more, got {self.max_float_layers}")
        if self.reconstruct_iters is not None and (not self.reconstruct or self.reconstruct_iters < 1):
            raise ConfigError(f"reconstruct iterations ({self.reconstruct_iters}) need reconstruction on and a positive count")

    @property
    def strategy(self):
        """The registered :class:`ditrt.calibrate.methods.Method` of ``method``."""
        return REGISTRY[self.method]

    @property
    def settings(self):
        """The method's settings: ``method_settings`` or the method's defaults."""
        return self.method_settings if self.method_settings is not None else self.strategy.settings()

    @property
    def weight_rounding(self) -> str:
        """``weights``, or the precision's default (:attr:`ditrt.contracts.precisions.Precision.default_weights`)."""
        return self.weights or get_precision(self.precision).default_weights

    @property
    def weight_scale_search(self) -> str:
        return self.weight_search or self.strategy.default_search

    @property
    def act_scale_search(self) -> str:
        return self.act_search or self.strategy.default_search
