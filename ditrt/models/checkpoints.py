"""Reading and writing DiT checkpoints, without ever unpickling code.

Accepted inputs:
- official facebookresearch/DiT ``.pt``/``.pth`` files: a state dict, or one under ``model``/``ema``
  (read with ``torch.load(weights_only=True)``), or the same keys in a ``.safetensors`` file;
- diffusers ``DiTTransformer2DModel`` folders (``config.json`` + weights) or weight files;
- ditrt's own ``.safetensors`` (official key layout, config in the metadata).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from ditrt import __version__
from ditrt.contracts.errors import CheckpointError
from ditrt.contracts.files import atomic_write
from ditrt.contracts.model_config import CONFIGS, DiTConfig
from ditrt.models.dit import DiT

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


def infer_official_config(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    """Architecture from official-layout shapes. Head count is not visible in shapes: it is taken
    from the named config with the same hidden size unless given."""
    try:
        hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
        tokens = sd["pos_embed"].shape[1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        num_classes = sd["y_embedder.embedding_table.weight"].shape[0]
        out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
        mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a DiT state dict: missing or malformed {e}; expected official DiT or diffusers keys") from None
    if num_heads is None:
        by_hidden = {c.hidden_size: c.num_heads for c in CONFIGS.values()}
        if hidden not in by_hidden:
            raise CheckpointError(f"cannot tell the head count of a DiT with hidden size {hidden}; pass --config with a named config")
        num_heads = by_hidden[hidden]
    learn_sigma = out_ch == 2 * in_ch
    # a null-class row exists when the model was trained with label dropout (all official ones)
    return DiTConfig(
        input_size=int(round(tokens**0.5)) * p,
        patch_size=p,
        in_channels=in_ch,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        num_classes=num_classes - 1,
        class_dropout_prob=0.1,
        learn_sigma=learn_sigma,
    )


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
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})
    return model


def _describe(c: DiTConfig) -> str:
    return f"(depth {c.depth}, hidden {c.hidden_size}, patch {c.patch_size}, {c.in_channels} ch, {c.input_size}px)"


def load_dit(path: str | Path, *, config: DiTConfig | str | None = None) -> DiT:
    """Load any supported checkpoint into an eval-mode :class:`DiT` on the CPU."""
    from ditrt.models import diffusers_compat

    path = Path(path)
    if isinstance(config, str):
        if config not in CONFIGS:
            raise CheckpointError(f"unknown config {config!r}; choose one of: {', '.join(CONFIGS)}")
        config = CONFIGS[config]
    if path.is_dir():
        return diffusers_compat.load_diffusers_dit(path).eval()
    sd, meta = _read_tensors(path)
    if meta.get("format") == DITRT_FORMAT:
        cfg = config or DiTConfig.from_dict(json.loads(meta["config"]))
    elif diffusers_compat.is_diffusers_state_dict(sd):
        sd, cfg = diffusers_compat.diffusers_to_official(sd, config)
    elif "x_embedder.proj.weight" in sd:
        cfg = config or infer_official_config(sd)
    else:
        first = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(sd.items())[:3])
        raise CheckpointError(f"{path} is not a DiT checkpoint (first keys: {first}); expected official DiT or diffusers keys")
    model = load_state_dict_into(DiT(cfg), sd, str(path))
    return model.eval()


def read_checkpoint_meta(path: str | Path) -> dict:
    """The ``extra`` metadata stored by :func:`save_ditrt_checkpoint` (empty for other files)."""
    _, meta = _read_tensors(Path(path))
    return json.loads(meta.get("extra", "{}"))
