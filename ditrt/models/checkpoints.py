"""Reading and writing DiT checkpoints, without ever unpickling code.

Accepted inputs:
- official facebookresearch/DiT ``.pt``/``.pth`` files: a state dict, or one under ``model``/``ema``
  (read with ``torch.load(weights_only=True)``), or the same keys in a ``.safetensors`` file;
- diffusers ``DiTTransformer2DModel`` folders (``config.json`` + weights) or weight files;
- ditrt's own ``.safetensors`` (official key layout, config in the metadata).
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from dataclasses import replace
from pathlib import Path

import torch

from ditrt import __version__
from ditrt.contracts.errors import CheckpointError
from ditrt.contracts.files import atomic_write
from ditrt.contracts.model_config import CONFIGS, DiTConfig
from ditrt.models.dit import DiT

log = logging.getLogger(__name__)

DITRT_FORMAT = "ditrt-dit"


# ---------------------------------------------------------------------------------- writing
def save_ditrt_checkpoint(model: DiT, path: Path, *, extra: dict | None = None) -> Path:
    """Save weights (official key layout) with the config and ``extra`` in the safetensors metadata."""
    from safetensors.torch import save_file

    meta = {"format": DITRT_FORMAT, "ditrt_version": __version__, "config": json.dumps(model.config.to_dict())}
    if extra:
        meta["extra"] = json.dumps(extra)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


# ---------------------------------------------------------------------------------- reading
def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata from a safetensors file or a weights-only torch pickle."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .pt, .safetensors or diffusers folder")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path} is not a readable safetensors file ({_short(e)}); re-download or re-save it") from None
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a torch zip checkpoint (truncated, or a legacy pickle); re-save it with torch.save or use safetensors"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects other than tensors and was refused, since loading it could run code "
            f"({_short(e)}); re-save only the state dict, or convert it to safetensors"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path} could not be read as a checkpoint ({_short(e)}); it may be truncated or corrupt") from None
    return _find_state_dict(obj, path), {}


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__


def _find_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return _find_state_dict(obj[key], path)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise CheckpointError(f"{path} holds no state dict (looked for a dict of tensors, or one under 'ema'/'model')")


def refuse_non_finite(sd: dict[str, torch.Tensor], source) -> None:
    """:class:`CheckpointError` naming the first floating-point tensor of ``sd`` holding NaN or inf."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{source} holds NaN or infinite values in {bad[0]}{more}: the checkpoint is corrupt or its training diverged; "
            "re-download it or use an earlier checkpoint"
        )


def _named_like(**shape) -> str | None:
    """The first named config whose fields equal ``shape`` (e.g. hidden_size=1152), if any."""
    return next((n for n, c in CONFIGS.items() if all(getattr(c, k) == v for k, v in shape.items())), None)


def class_rows_config(cfg: DiTConfig, rows: int, source, *, say: bool = True) -> DiTConfig:
    """``cfg`` with ``class_dropout_prob`` matching a label table of ``rows`` rows.

    As in the official ``LabelEmbedder``, a model trained with label dropout has ``num_classes + 1``
    rows (the last is the null class that classifier-free guidance needs); one trained without has
    exactly ``num_classes`` rows and cannot be guided (said once as a warning unless ``say`` is False,
    for a caller that said it already). Any other count contradicts ``cfg``."""
    n = cfg.num_classes
    if rows == n + 1:
        return cfg if cfg.class_dropout_prob > 0 else replace(cfg, class_dropout_prob=0.1)
    if rows == n:
        if say:
            log.warning("%s has no null-class row (%d label rows for %d classes: trained without label dropout), "
                        "so classifier-free guidance is impossible; sample it with --cfg-scale 1", source, rows, n)  # fmt: skip
        return replace(cfg, class_dropout_prob=0.0)
    raise CheckpointError(
        f"{source} has {rows} label-embedding rows, but {n} classes take {n} (no null class) or {n + 1} (with the null class); "
        f"pass --num-classes {rows - 1} (with a null class, as official DiTs) or --num-classes {rows} (trained without label dropout)"
    )


def _guess_classes(rows: int) -> tuple[int, str]:
    """(classes, what was assumed) for a label table of ``rows`` rows when no class count is given."""
    named = sorted({c.num_classes for c in CONFIGS.values()})
    if rows - 1 in named:
        return rows - 1, f"{rows - 1} classes and a null-class row ({rows} label rows, as the official DiT trained with label dropout)"
    if rows in named:
        return rows, (
            f"{rows} classes and no null-class row ({rows} label rows: trained without label dropout, "
            "so classifier-free guidance is impossible; sample with --cfg-scale 1)"
        )
    return rows - 1, f"{rows - 1} classes and a null-class row ({rows} label rows; the official layout keeps one null row)"


def infer_official_config(
    sd: dict[str, torch.Tensor], num_heads: int | None = None, *, num_classes: int | None = None, source="the checkpoint"
) -> DiTConfig:
    """Architecture from official-layout shapes (``sd``: official key layout).

    Two fields no shape fixes are taken from the arguments, else guessed and the guess logged once
    (one warning naming the options that override it): ``num_heads`` (guessed from the named config
    with the same hidden size) and ``num_classes`` (the label table has ``num_classes + 1`` rows when
    the model was trained with label dropout, ``num_classes`` without; guessed from the named
    configs' class counts). ``class_dropout_prob`` is 0 exactly when there is no null-class row."""
    try:
        hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
        tokens = sd["pos_embed"].shape[1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
        out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a DiT state dict: missing or malformed {e}; expected official DiT or diffusers keys") from None
    input_size = int(round(tokens**0.5)) * p
    guesses = []
    if num_heads is None:
        like = _named_like(hidden_size=hidden, depth=depth, patch_size=p, input_size=input_size) or _named_like(hidden_size=hidden)
        if like is None:
            raise CheckpointError(
                f"cannot tell the head count of a DiT with hidden size {hidden} (no shape shows it); "
                "pass --num-heads N or --config with a named config"
            )
        num_heads = CONFIGS[like].num_heads
        guesses.append(f"{num_heads} heads (those of {like}, hidden size {hidden}; no shape shows the head count)")
    _check_heads(hidden, num_heads)
    classes_guessed = num_classes is None
    if classes_guessed:
        num_classes, said = _guess_classes(rows)
        guesses.append(said)
    cfg = DiTConfig(
        input_size=input_size,
        patch_size=p,
        in_channels=in_ch,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        num_classes=num_classes,
        learn_sigma=out_ch == 2 * in_ch,
    )
    if guesses:
        log.warning("%s records no config; assumed from its shapes: %s. Pass --config NAME, --num-heads N or --num-classes N "
                    "if that is wrong", source, "; ".join(guesses))  # fmt: skip
    return class_rows_config(cfg, rows, source, say=not classes_guessed)


def _check_heads(hidden: int, num_heads: int) -> None:
    if num_heads < 1 or hidden % num_heads:
        raise CheckpointError(f"--num-heads {num_heads} does not divide the hidden size {hidden}; pass a divisor of {hidden}")


def load_state_dict_into(model: DiT, sd: dict[str, torch.Tensor], source: str) -> DiT:
    """Load with a one-line error naming the first mismatched keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + ", ".join(wrong[:3]))
        if missing:
            parts.append("missing: " + ", ".join(missing[:3]))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:3]))
        raise CheckpointError(f"{source} does not match DiT {_describe(model.config)} ({'; '.join(parts)}); check --config or the file")
    on_meta = any(t.is_meta for t in own.values())  # built without storage (model_from_state_dict): the tensors become its weights
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, assign=on_meta)
    return model


def _describe(c: DiTConfig) -> str:
    return f"(depth {c.depth}, hidden {c.hidden_size}, patch {c.patch_size}, {c.in_channels} ch, {c.input_size}px)"


def load_dit(
    path: str | Path, *, config: DiTConfig | str | None = None, num_classes: int | None = None, num_heads: int | None = None
) -> DiT:
    """Load any supported checkpoint into an eval-mode :class:`DiT` on the CPU.

    ``config``: a :class:`DiTConfig` or a name in :data:`CONFIGS`; without one the config is read
    from the file (ditrt safetensors, diffusers ``config.json``) or inferred from official-layout
    shapes (:func:`infer_official_config`). ``num_classes`` / ``num_heads`` override those two
    fields, the ones shapes alone do not fix (a diffusers folder states both in its config.json).
    Whether the label table has a null-class row is read from its shape, so a model trained without
    label dropout keeps all its classes (``class_dropout_prob`` 0). Refuses, with one line each,
    non-finite weights and any mismatch."""
    from ditrt.models import diffusers_compat

    path = Path(path)
    if isinstance(config, str):
        if config not in CONFIGS:
            raise CheckpointError(f"unknown config {config!r}; choose one of: {', '.join(CONFIGS)}")
        config = CONFIGS[config]
    for name, value in (("--num-classes", num_classes), ("--num-heads", num_heads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointError(f"{name} must be a positive integer, got {value!r}")
    if path.is_dir():
        if config is not None or num_classes is not None or num_heads is not None:
            raise CheckpointError(
                f"{path} is a diffusers folder: its config.json gives the architecture; drop --config, --num-classes and --num-heads"
            )
        return load_diffusers_dit(path)
    sd, meta = _read_tensors(path)
    refuse_non_finite(sd, path)
    if meta.get("format") == DITRT_FORMAT:
        cfg = _override(config or DiTConfig.from_dict(json.loads(meta["config"])), num_classes, num_heads)
    elif diffusers_compat.is_diffusers_state_dict(sd):
        sd, cfg = diffusers_compat.diffusers_to_official(sd, _override(config, num_classes, num_heads))
    elif "x_embedder.proj.weight" in sd:
        if config is None:  # inferred: the class rows are reconciled (and said) there
            return model_from_state_dict(infer_official_config(sd, num_heads, num_classes=num_classes, source=path), sd, path, rows=False)
        cfg = _override(config, num_classes, num_heads)
    else:
        first = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(sd.items())[:3])
        raise CheckpointError(f"{path} is not a DiT checkpoint (first keys: {first}); expected official DiT or diffusers keys")
    return model_from_state_dict(cfg, sd, path)


def model_from_state_dict(cfg: DiTConfig, sd: dict[str, torch.Tensor], source, *, rows: bool = True) -> DiT:
    """An eval-mode :class:`DiT` of ``cfg`` holding ``sd`` (official layout); ``rows``: first fit
    ``class_dropout_prob`` to the label table (:func:`class_rows_config`)."""
    key = "y_embedder.embedding_table.weight"
    table = sd.get(key)
    if rows and table is not None and table.ndim == 2:
        try:
            cfg = class_rows_config(cfg, table.shape[0], source)
        except CheckpointError:  # another architecture altogether: name its first mismatched shapes instead
            model = DiT(cfg)
            if any(k != key and k in sd and sd[k].shape != v.shape for k, v in model.state_dict().items()):
                load_state_dict_into(model, sd, str(source))
            raise
    with torch.device("meta"):  # no randomly initialised second copy of the weights (DiT-XL/2: 2.7 GB)
        model = DiT(cfg)
    return load_state_dict_into(model, sd, str(source)).eval()


def _override(cfg: DiTConfig | None, num_classes: int | None, num_heads: int | None) -> DiTConfig | None:
    """``cfg`` with the explicitly given fields replaced (None when there is no config to override)."""
    given = {k: v for k, v in (("num_classes", num_classes), ("num_heads", num_heads)) if v is not None}
    if cfg is None or not given:
        return cfg
    if num_heads is not None:
        _check_heads(cfg.hidden_size, num_heads)
    return replace(cfg, **given)


def read_checkpoint_meta(path: str | Path) -> dict:
    """The ``extra`` metadata stored by :func:`save_ditrt_checkpoint` (empty for other files)."""
    _, meta = _read_tensors(Path(path))
    return json.loads(meta.get("extra", "{}"))


def load_diffusers_dit(folder: Path) -> DiT:
    """A diffusers ``DiTTransformer2DModel`` folder (or a pipeline folder with ``transformer/``)."""
    from ditrt.models.diffusers_compat import config_from_diffusers, diffusers_to_official

    folder = Path(folder)
    if (folder / "transformer" / "config.json").exists():
        folder = folder / "transformer"
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder} has no config.json; pass a diffusers DiTTransformer2DModel folder or a checkpoint file")
    try:
        config = config_from_diffusers(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-save the model with save_pretrained") from None
    weights = [folder / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin") if (folder / n).exists()]
    if not weights:
        raise CheckpointError(f"{folder} has no diffusion_pytorch_model.safetensors (or .bin); sharded weights are not supported")
    sd, _ = _read_tensors(weights[0])
    refuse_non_finite(sd, weights[0])
    sd, config = diffusers_to_official(sd, config)
    return model_from_state_dict(config, sd, folder)
