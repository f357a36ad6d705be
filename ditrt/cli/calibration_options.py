"""The calibration options, defined once for every command that calibrates (``ditrt calibrate``,
``ditrt pipeline``), so they cannot disagree.

Defaults and choices are read from the library: :class:`ditrt.calibrate.ptq.CalibrateConfig`,
the method settings dataclasses of :mod:`ditrt.calibrate.methods`, :class:`CalibrationSettings`,
the precision registry and :data:`METHODS`. Use::

    @main.command()
    @calibration_options
    def cmd(..., **options):
        config = calibrate_config_from_options(**options)  # validates everything, before any work

Options that only make sense for one method (``--alpha``, ``--qdit-*``) default to None, so that
giving one with another method is refused instead of silently ignored. The set holds nothing
command-specific (no ``--out``, ``--model``, ``--device``): commands add those themselves.
"""

from __future__ import annotations

import dataclasses
import functools

import click

from ditrt.calibrate.config import CalibrateConfig
from ditrt.calibrate.methods import QDIT_CHANNEL, QDIT_FITNESSES, REGISTRY, QDiTSettings, SmoothQuantSettings
from ditrt.contracts.errors import ConfigError
from ditrt.contracts.precisions import INT4_BLOCK_SIZES, PRECISIONS, get_precision
from ditrt.contracts.recipe import METHODS, SEARCHES, WEIGHT_ROUNDINGS, CalibrationSettings


def _default(cls, name: str):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


_C = functools.partial(_default, CalibrateConfig)
_S = functools.partial(_default, CalibrationSettings)
_CHANNEL_WORD = "channel"  # how --qdit-choices spells QDIT_CHANNEL (per-channel INT4)


def _choices_text(candidates) -> str:
    return ",".join(_CHANNEL_WORD if c == QDIT_CHANNEL else str(c) for c in candidates)


#: option -> (method it belongs to, settings field); the default is the settings dataclass's.
METHOD_OPTIONS = {
    "alpha": ("smoothquant", "alpha"),
    "qdit_budget": ("qdit", "budget"),
    "qdit_fitness": ("qdit", "fitness"),
    "qdit_choices": ("qdit", "candidates"),
}

_SEARCH_HELP = "min-max, PTQ4DiT's percentile clips, an MSE clip search of the tensor's own error, or the clip with the lowest layer-output error"
_DEFAULT_SEARCH = ", ".join(sorted({m.default_search for m in REGISTRY.values()}))  # one default for every method today

_OPTIONS = [
    click.option("--method", type=click.Choice(METHODS), default=_C("method"), show_default=True,
                 help="Calibration method. " + "; ".join(f"{n}: {m.summary}" for n, m in REGISTRY.items()) + "."),
    click.option("--precision", type=click.Choice(list(PRECISIONS)), default=_C("precision"), show_default=True,
                 help="Quantization precision. " + "; ".join(
                     f"{p.name}: {p.summary}" for p in PRECISIONS.values()) + "."),
    click.option("--calib-timesteps", type=int, default=_S("timesteps"), show_default=True,
                 help="Recorded steps of the calibration sampling run (uniformly spaced)."),
    click.option("--calib-samples", type=int, default=_S("samples"), show_default=True,
                 help="Images per recorded step (each also with the null class)."),
    click.option("--calib-steps", default=_S("steps"), show_default=True,
                 help="Sampling schedule of the calibration run: 250, 100, 50 (DDPM steps) or ddim50."),
    click.option("--calib-cfg-scale", type=float, default=_S("cfg_scale"), show_default=True,
                 help="Classifier-free guidance scale of the calibration run."),
    click.option("--calib-seed", type=int, default=_S("seed"), show_default=True,
                 help="Seed of the calibration run (noise and labels) and of the methods' random subsets."),
    click.option("--quantize-all", is_flag=True, default=_C("quantize_all"),
                 help="Also quantize embedders, adaLN and the final layer (the paper's setting)."),
    click.option("--scale-search", type=click.Choice(SEARCHES), default=None,
                 help=f"Scale search for weights AND activations ({_SEARCH_HELP}); not with --weight-search/--act-search."),
    click.option("--weight-search", type=click.Choice(SEARCHES), default=None,
                 help=f"Scale search for weights [default: {_DEFAULT_SEARCH}]."),
    click.option("--act-search", type=click.Choice(SEARCHES), default=None,
                 help=f"Scale search for activations [default: {_DEFAULT_SEARCH}]."),
    click.option("--asymmetric", is_flag=True, default=not _C("symmetric"),
                 help="Asymmetric quantizers (simulation only: TensorRT needs zero point 0)."),
    click.option("--block-size", type=click.Choice([str(b) for b in INT4_BLOCK_SIZES]), default=None,
                 help=f"INT4 weight block along the input dimension, for block-wise precisions [default: {_C('block_size')}]."),
    click.option("--timestep-groups", type=int, default=_C("timestep_groups"), show_default=True,
                 help="K activation-scale groups over the trajectory (at most --calib-timesteps); exports one graph per group."),
    click.option("--dynamic-activations", is_flag=True, default=_C("dynamic_activations"),
                 help="Per-sample activation scales at run time (Q-DiT; simulation only)."),
    click.option("--reconstruct", is_flag=True, default=_C("reconstruct"),
                 help="BRECQ/AdaRound block reconstruction after calibration (any method)."),
    click.option("--reconstruct-iters", type=int, default=None,
                 help="Reconstruction iterations per block, with --reconstruct [default: ReconstructSettings']."),
    click.option("--weights", type=click.Choice(WEIGHT_ROUNDINGS), default=None,
                 help="Weight rounding: rtn (round to nearest) or gptq (Hessian-compensated, on the same grids) [default: "
                      + ", ".join(f"{p.default_weights} at {p.name}" for p in PRECISIONS.values()) + "]."),
    click.option("--smooth-fc2", is_flag=True, default=_C("smooth_fc2"),
                 help="Balancing methods also smooth fc2 (a run-time per-channel Mul on the GELU output, exported before its Q)."),
    click.option("--min-psnr", type=float, default=None,
                 help="Leave the most sensitive layers in float16 until a short paired probe reaches this PSNR (dB)."),
    click.option("--max-float-layers", type=int, default=None,
                 help="At most this many layers left in float (alone: the N most sensitive; with --min-psnr: the limit)."),
    click.option("--alpha", type=float, default=None,
                 help=f"smoothquant: migration strength in [0, 1] [default: {_default(SmoothQuantSettings, 'alpha')}]."),
    click.option("--qdit-budget", type=float, default=None,
                 help="qdit: minimum mean INT4 group size, weighted by weights [default: no budget]."),
    click.option("--qdit-fitness", type=click.Choice(QDIT_FITNESSES), default=None,
                 help="qdit: paired PSNR or FD of a small sample set (pixel models), or the layer-output error (any model) "
                      f"[default: {_default(QDiTSettings, 'fitness')}]."),
    click.option("--qdit-choices", default=None,
                 help=f"qdit: comma-separated INT4 choices among {_choices_text((*INT4_BLOCK_SIZES, QDIT_CHANNEL))}; "
                      f"'{_CHANNEL_WORD}' is per-channel INT4 (not a TensorRT format: simulation only) "
                      f"[default: {_choices_text(_default(QDiTSettings, 'candidates'))}]."),
]  # fmt: skip

#: the keyword names the decorated command receives (and :func:`calibrate_config_from_options` takes)
OPTION_NAMES = tuple(o(lambda **_: None).__click_params__[0].name for o in _OPTIONS)


def calibration_options(f):
    """Add every calibration option to a click command (in --help order)."""
    for option in reversed(_OPTIONS):
        f = option(f)
    return f


def _parse_choices(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == _CHANNEL_WORD:
            out.append(QDIT_CHANNEL)
        elif part in {str(b) for b in INT4_BLOCK_SIZES}:
            out.append(int(part))
        else:
            raise ConfigError(f"--qdit-choices takes {_choices_text((*INT4_BLOCK_SIZES, QDIT_CHANNEL))} (comma-separated), got {part!r}")
    return tuple(out)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def calibrate_config_from_options(**options) -> CalibrateConfig:
    """The :class:`CalibrateConfig` (with its :class:`CalibrationSettings`) of the options of
    :func:`calibration_options`; every value and combination is checked here, before any work, and a
    bad one is a :class:`ConfigError` naming the option and the fix. Options not given take the
    library's defaults."""
    from ditrt.diffusion.schedule import make_schedule

    unknown = set(options) - set(OPTION_NAMES)
    if unknown:
        raise TypeError(f"not calibration options: {sorted(unknown)}")
    o = {name: options.get(name) for name in OPTION_NAMES}
    method, precision = o["method"] or _C("method"), o["precision"] or _C("precision")
    get_precision(precision)
    p = PRECISIONS[precision]
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is unknown; choose one of: {', '.join(METHODS)}")
    for name, (owner, _) in METHOD_OPTIONS.items():
        if o[name] is not None and owner != method:
            raise ConfigError(f"{_flag(name)} is a {owner} setting and --method is {method}; drop it or use --method {owner}")

    for name, default in (("calib_timesteps", _S("timesteps")), ("calib_samples", _S("samples"))):
        value = default if o[name] is None else o[name]
        if value < 1:
            raise ConfigError(f"{_flag(name)} must be a positive count, got {value}")
        o[name] = value
    steps = str(o["calib_steps"] if o["calib_steps"] is not None else _S("steps"))
    try:
        recorded = min(o["calib_timesteps"], make_schedule(steps).num_steps)
    except ConfigError as e:
        raise ConfigError(f"--calib-steps: {e}") from None
    cfg_scale = _S("cfg_scale") if o["calib_cfg_scale"] is None else o["calib_cfg_scale"]
    if not cfg_scale >= 1.0:
        raise ConfigError(f"--calib-cfg-scale must be >= 1.0 (1.0 disables guidance), got {cfg_scale}")
    seed = _S("seed") if o["calib_seed"] is None else o["calib_seed"]
    settings = CalibrationSettings(steps=steps, timesteps=o["calib_timesteps"], samples=o["calib_samples"], cfg_scale=cfg_scale, seed=seed)

    if o["scale_search"] is not None and (o["weight_search"] is not None or o["act_search"] is not None):
        raise ConfigError("--scale-search sets both scale searches; give it alone, or --weight-search and/or --act-search instead")
    weight_search = o["weight_search"] or o["scale_search"]
    act_search = o["act_search"] or o["scale_search"]
    if o["act_search"] is not None and not p.quantizes_activations:
        raise ConfigError(f"--act-search has no effect: {precision} does not quantize activations; drop it or use --weight-search")

    groups = _C("timestep_groups") if o["timestep_groups"] is None else o["timestep_groups"]
    if not p.quantizes_activations and groups != 1:
        raise ConfigError(f"--timestep-groups sets activation scales, but {precision} does not quantize activations; drop it")
    if groups < 1 or groups > recorded:
        raise ConfigError(f"--timestep-groups must be between 1 and the {recorded} recorded timesteps (--calib-timesteps), got {groups}")
    if o["dynamic_activations"] and not p.quantizes_activations:
        raise ConfigError(f"--dynamic-activations: {precision} does not quantize activations; drop it")
    if o["block_size"] is not None and p.weight_granularity != "block":
        raise ConfigError(f"--block-size is for block-wise INT4 weights, but {precision} weights are per channel; drop it")
    block = _C("block_size") if o["block_size"] is None else int(o["block_size"])
    if block not in INT4_BLOCK_SIZES:
        raise ConfigError(f"--block-size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))} (TensorRT's INT4 blocks), got {block}")
    if o["reconstruct_iters"] is not None and (not o["reconstruct"] or o["reconstruct_iters"] < 1):
        raise ConfigError(f"--reconstruct-iters {o['reconstruct_iters']} needs --reconstruct and a positive count")

    strategy = REGISTRY[method]
    fields = {field: o[name] for name, (owner, field) in METHOD_OPTIONS.items() if owner == method and o[name] is not None}
    if "candidates" in fields:
        fields["candidates"] = _parse_choices(fields["candidates"])
    if fields and not strategy.applies(p):  # the method does nothing at this precision: its settings would be ignored
        raise ConfigError(f"{', '.join(_flag(n) for n in METHOD_OPTIONS if o[n] is not None)}: " + strategy.notes(p)[0])
    method_settings = strategy.settings(**fields) if fields else None
    return CalibrateConfig(
        method=method, precision=precision, method_settings=method_settings, weight_search=weight_search, act_search=act_search,
        quantize_all=bool(o["quantize_all"]), symmetric=not o["asymmetric"], block_size=block, timestep_groups=groups,
        dynamic_activations=bool(o["dynamic_activations"]), reconstruct=bool(o["reconstruct"]),
        reconstruct_iters=o["reconstruct_iters"], calibration=settings, weights=o["weights"],
        smooth_fc2=bool(o["smooth_fc2"]), min_psnr=o["min_psnr"], max_float_layers=o["max_float_layers"],
    )  # fmt: skip
