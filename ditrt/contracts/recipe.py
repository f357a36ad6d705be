"""The quantization recipe: what ``ditrt calibrate`` writes and every later stage reads.

A recipe directory holds
- ``recipe.json``: :class:`Recipe` (method, precision, layer list, calibration settings, the hash
  of the float model it was made from, ditrt version);
- ``weights.safetensors``: ``model.<name>`` the full float state dict *after* balancing was folded
  in (it computes exactly what the original float model computes), and for each quantized layer L
  ``quant.L.weight_scale`` and, with activation quantization, ``quant.L.input_scale``
  (``quant.L.weight_zero_point`` / ``quant.L.input_zero_point`` only in asymmetric, simulation-only
  recipes).
  For the layers in :attr:`Recipe.runtime_smoothed` (each block's fc2 with ``--smooth-fc2``),
  ``model.L.weight`` holds ``W * d`` (input columns) and ``quant.L.input_divisor`` (in,) float32 holds
  ``d``: the float computation multiplies L's input by ``1 / d`` first
  (:func:`ditrt.models.quantized.folded_float_model`), so ``model.*`` alone is not the original model for
  those layers; the export writes that multiply as one Mul ahead of L's QuantizeLinear. Layers in
  :attr:`Recipe.float_layers` were left in float by the sensitivity fallback: they are not in
  ``layers``, have no ``quant.L.*`` and export without Q/DQ. With ``weight_rounding == "gptq"`` (or
  ``reconstructed``) ``model.L.weight`` of a quantized layer is on its grid (``q * scale``).

Quantizer semantics, shared by the torch simulation and the ONNX Q/DQ export:
``q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)``, ``x_hat = (q - zero_point) * scale``
with ``qmin, qmax = -2^(b-1), 2^(b-1) - 1`` (signed; INT8 -128..127, INT4 -8..7), as ONNX
QuantizeLinear/DequantizeLinear define them; FP8 (precision ``fp8``) rounds ``x / scale`` clamped to
+-448 to the nearest E4M3 value instead, with no zero point (:mod:`ditrt.contracts.quantizers`; its
``weight_bits``/``act_bits`` are 8 like INT8's: the precision names the grid). Weight scales of a
Linear with weight (out, in): ``(out,)`` per output channel, ``()`` per tensor (fp8), or
``(out, in // block)`` block-wise along the input dimension.
Block sizes may differ per layer (``qdit``): the scale's shape says which (``(out,)`` per channel,
``(out, in // block)`` block-wise) and :attr:`Recipe.layer_block_sizes` records it.
Input (activation) scales are per tensor: shape ``()``, or ``(K,)`` with K timestep groups
(:attr:`Recipe.timestep_group_edges`): one scale per range of timesteps, one exported graph each.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ditrt import __version__
from ditrt.contracts.errors import ArtifactError, InputError
from ditrt.contracts.precisions import INT4_BLOCK_SIZES, Precision, get_precision

RECIPE_FORMAT = "ditrt-recipe"
#: The calibration methods a recipe may name; each is a strategy registered in :mod:`ditrt.calibrate.methods`.
METHODS = ("minmax", "smoothquant", "ptq4dit", "ditas", "qdit")
#: The scale searches a recipe may record (``scale_search`` of its weights, ``act_scale_search`` of its
#: activations); each is implemented in :mod:`ditrt.calibrate.scale_search`.
SEARCHES = ("minmax", "percentile", "mse", "output")
#: How a recipe's weights are rounded onto their grid (``weight_rounding``): "rtn" round to nearest at
#: export time; "gptq" GPTQ's Hessian-compensated rounding (:mod:`ditrt.calibrate.gptq`), written back on
#: the grid so that round to nearest reproduces it. Block reconstruction is the separate ``reconstructed`` flag.
WEIGHT_ROUNDINGS = ("rtn", "gptq")


@dataclass(frozen=True)
class CalibrationSettings:
    steps: str = "250"  # the sampling schedule calibration runs
    timesteps: int = 25  # uniformly spaced steps of that schedule that are recorded
    samples: int = 32  # images per recorded step (each also with the null class)
    cfg_scale: float = 1.5
    seed: int = 0


@dataclass(frozen=True)
class Recipe:
    method: str
    precision: str
    layers: tuple[str, ...]
    model_hash: str
    model_config: dict
    weight_bits: int = 8
    act_bits: int | None = 8
    weight_granularity: str = "channel"  # "channel", "tensor" (fp8) or "block"
    block_size: int | None = None
    symmetric: bool = True
    scale_search: str = "mse"  # weights: "minmax", "percentile" or "mse"
    act_scale_search: str = "mse"
    alpha: float | None = None  # smoothquant migration strength
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    balanced_layers: tuple[str, ...] = ()
    layer_block_sizes: dict = field(default_factory=dict)  # layer -> INT4 block (0: per channel) where it differs per layer
    timestep_group_edges: tuple[float, ...] = ()  # K-1 timesteps splitting [0, 1000) into K activation-scale groups
    dynamic_activations: bool = False  # per-sample scales computed at run time: simulation only
    reconstructed: bool = False  # weights rounded and activation scales learned by block reconstruction
    weight_rounding: str = "rtn"  # WEIGHT_ROUNDINGS
    float_layers: dict = field(default_factory=dict)  # layer -> its sensitivity record: left in float (not in ``layers``)
    runtime_smoothed: tuple[str, ...] = ()  # layers whose input is divided per channel at run time (quant.L.input_divisor)
    details: dict = field(default_factory=dict)  # method-specific record (alphas, search history, reconstruction errors)
    notes: tuple[str, ...] = ()
    ditrt_version: str = __version__

    @property
    def spec(self) -> Precision:
        """The registry entry of this recipe's precision."""
        return get_precision(self.precision)

    @property
    def deployable(self) -> bool:
        blocks_ok = all(b in INT4_BLOCK_SIZES for b in self.layer_block_sizes.values()) if self.weight_bits == 4 else True
        return self.symmetric and self.spec.tensorrt and not self.dynamic_activations and blocks_ok

    def block_of(self, layer: str) -> int | None:
        """The INT4 block of ``layer`` (None per channel)."""
        if self.spec.weight_granularity != "block" and layer not in self.layer_block_sizes:
            return None
        return self.layer_block_sizes.get(layer, self.block_size) or None

    @property
    def timestep_groups(self) -> int:
        return len(self.timestep_group_edges) + 1

    def group_of(self, t: float) -> int:
        """The activation-scale group of training timestep ``t``: 0 holds the noisiest steps (sampled first)."""
        return timestep_group(t, self.timestep_group_edges)

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = RECIPE_FORMAT
        d["deployable"] = self.deployable
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        d = json.loads(text)
        if d.pop("format", None) != RECIPE_FORMAT:
            raise ArtifactError("not a ditrt recipe.json (format field missing); create one with `ditrt calibrate`")
        d.pop("deployable", None)
        d["calibration"] = CalibrationSettings(**d.get("calibration", {}))
        for k in ("layers", "balanced_layers", "notes", "timestep_group_edges", "runtime_smoothed"):
            d[k] = tuple(d.get(k, ()))
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        recipe = cls(**known)
        recipe.validate()
        return recipe

    def validate(self) -> None:
        """Refuse a recipe whose fields contradict the registry (an edited or foreign recipe.json)."""
        fix = "re-run `ditrt calibrate` instead of editing recipe.json"
        try:
            p = get_precision(self.precision)
        except Exception as e:
            raise ArtifactError(f"recipe.json: {e}; {fix}") from None
        if self.method not in METHODS:
            raise ArtifactError(f"recipe.json names the unknown method {self.method!r} (known: {', '.join(METHODS)}); {fix}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ArtifactError(f"recipe.json names the unknown weight rounding {self.weight_rounding!r} (known: {', '.join(WEIGHT_ROUNDINGS)}); {fix}")
        both = set(self.layers) & set(self.float_layers)
        if both:
            raise ArtifactError(f"recipe.json lists {sorted(both)[0]} both as quantized and as left in float; {fix}")
        if not set(self.runtime_smoothed) <= set(self.layers):
            raise ArtifactError(f"recipe.json smooths layers at run time that it does not quantize; {fix}")
        if (self.weight_bits, self.act_bits) != (p.weight_bits, p.act_bits):
            raise ArtifactError(
                f"recipe.json says w{self.weight_bits}/a{self.act_bits} bits, but {p.name} is w{p.weight_bits}/a{p.act_bits}; {fix}"
            )


def timestep_group(t: float, edges) -> int:
    """Group index of ``t`` for descending ``edges``: the number of edges above ``t``."""
    return sum(float(t) < e for e in edges)


def batch_timestep_group(t, edges) -> int:
    """The one group of every timestep in the batch ``t`` (a tensor or sequence); :class:`InputError` if they differ."""
    values = t.reshape(-1).tolist() if hasattr(t, "reshape") else list(t)
    groups = {timestep_group(v, edges) for v in values}
    if len(groups) != 1:
        raise InputError("a batch mixes timesteps of different activation-scale groups; call one group at a time")
    return groups.pop()


@dataclass(frozen=True)
class LayerQuant:
    """The quantization data of one layer, typed (on disk: ``quant.<layer>.*`` in weights.safetensors).

    ``weight_scale``: ``(out,)`` per output channel or ``(out, in // block)`` block-wise;
    ``input_scale``: ``()`` or ``(K,)`` for K timestep groups, None without activation quantization;
    zero points only in asymmetric (simulation-only) recipes."""

    weight_scale: object
    input_scale: object | None = None
    weight_zero_point: object | None = None
    input_zero_point: object | None = None

    def input_scale_of(self, group: int):
        """The per-tensor input scale of timestep group ``group`` (a recipe without groups has one)."""
        s = self.input_scale
        return s if s is None or s.ndim == 0 else s[group]


def layer_quant(tensors: dict, layer: str) -> LayerQuant:
    """The typed quantization data of ``layer`` from a recipe's tensors; :class:`ArtifactError` if it lacks the weight scale."""
    p = f"quant.{layer}."
    if p + "weight_scale" not in tensors:
        raise ArtifactError(f"recipe tensors lack {p}weight_scale; the recipe folder is incomplete, re-run `ditrt calibrate`")
    return LayerQuant(tensors[p + "weight_scale"], tensors.get(p + "input_scale"), tensors.get(p + "weight_zero_point"),
                      tensors.get(p + "input_zero_point"))  # fmt: skip


def layer_quant_tensors(layer: str, quant: LayerQuant) -> dict:
    """The on-disk form of :class:`LayerQuant`: ``quant.<layer>.<field>`` for every field that is set."""
    fields = ("weight_scale", "input_scale", "weight_zero_point", "input_zero_point")
    return {f"quant.{layer}.{f}": getattr(quant, f) for f in fields if getattr(quant, f) is not None}


def folded_state(tensors: dict) -> dict:
    """The float state dict the recipe folded its balancing into (``model.*``, prefix stripped); empty if none."""
    return {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}


def save_recipe(recipe: Recipe, tensors: dict, out_dir: Path) -> Path:
    """Write ``recipe.json`` and ``weights.safetensors`` atomically (each file by rename)."""
    from safetensors.torch import save_file

    from ditrt.contracts.files import atomic_write

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(out_dir / "weights.safetensors", lambda tmp: save_file(contiguous, str(tmp), metadata={"format": RECIPE_FORMAT}))
    atomic_write(out_dir / "recipe.json", lambda tmp: tmp.write_text(recipe.to_json()))
    return out_dir


def load_recipe(recipe_dir: Path) -> tuple[Recipe, dict]:
    """The recipe and its tensors (``model.*`` and ``quant.*``)."""
    from safetensors.torch import load_file

    recipe_dir = Path(recipe_dir)
    rj, wt = recipe_dir / "recipe.json", recipe_dir / "weights.safetensors"
    if not rj.exists() or not wt.exists():
        raise ArtifactError(f"{recipe_dir} is not a recipe folder (needs recipe.json and weights.safetensors); create it with `ditrt calibrate`")
    try:
        recipe = Recipe.from_json(rj.read_text())
    except (json.JSONDecodeError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{rj} is not a valid recipe ({e}); re-run `ditrt calibrate`") from None
    try:
        tensors = load_file(str(wt))
    except Exception as e:
        raise ArtifactError(f"{wt} cannot be read ({str(e).splitlines()[0]}); re-run `ditrt calibrate`") from None
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not bool(v.isfinite().all())), None)
    if bad is not None:
        raise ArtifactError(f"{wt} holds NaN or infinite values in {bad}; re-run `ditrt calibrate` on a model with finite weights")
    return recipe, tensors


def check_recipe_matches(recipe: Recipe, model_hash: str, source: str) -> None:
    """Refuse a recipe made for other weights."""
    if recipe.model_hash != model_hash:
        raise ArtifactError(
            f"this recipe was calibrated for model {recipe.model_hash[:12]}, not {source} ({model_hash[:12]}); "
            "pass the --model it was made from, or re-run `ditrt calibrate` for this model"
        )
