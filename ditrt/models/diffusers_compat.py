"""The key mapping between diffusers' ``DiTTransformer2DModel`` and the official DiT layout.

diffusers splits the fused qkv into ``to_q/to_k/to_v``, keeps a copy of the timestep/label
embedders in every block (ported checkpoints hold identical copies; block 0's is used for the
final layer), computes the position embedding instead of storing it, and uses two constants of its
own (timestep frequency shift 1, ``norm_eps`` in each block's second LayerNorm): both are carried
in :class:`DiTConfig` so a diffusers model is reproduced exactly.
"""

from __future__ import annotations

import logging

import torch

from ditrt.contracts.errors import CheckpointError
from ditrt.contracts.model_config import DiTConfig
from ditrt.models.dit import sincos_pos_embed_2d

log = logging.getLogger(__name__)

_EMB = "transformer_blocks.{i}.norm1.emb."
_SHARED = {  # official key -> diffusers key (block 0's copy)
    "t_embedder.mlp.0": _EMB + "timestep_embedder.linear_1",
    "t_embedder.mlp.2": _EMB + "timestep_embedder.linear_2",
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_PER_BLOCK = {  # official blocks.{i}.* -> diffusers transformer_blocks.{i}.*
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_LABELS = _EMB + "class_embedder.embedding_table.weight"


def is_diffusers_state_dict(sd: dict) -> bool:
    return "pos_embed.proj.weight" in sd and any(k.startswith("transformer_blocks.") for k in sd)


def _depth(sd: dict, prefix: str) -> int:
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(prefix))


def diffusers_to_official(sd: dict[str, torch.Tensor], config: DiTConfig | None = None) -> tuple[dict, DiTConfig]:
    """Official-layout state dict and the config (inferred from shapes when not given)."""
    try:
        depth = _depth(sd, "transformer_blocks.")
        out = {}
        for off, dif in _SHARED.items():
            for p in ("weight", "bias"):
                out[f"{off}.{p}"] = sd[f"{dif.format(i=0)}.{p}"]
        out["y_embedder.embedding_table.weight"] = sd[_LABELS.format(i=0)]
        for i in range(depth):
            b = f"transformer_blocks.{i}."
            for p in ("weight", "bias"):
                out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([sd[f"{b}attn1.to_{n}.{p}"] for n in "qkv"])
                for off, dif in _PER_BLOCK.items():
                    out[f"blocks.{i}.{off}.{p}"] = sd[b + dif + "." + p]
            _check_shared_embedders(sd, i)
    except KeyError as e:
        raise CheckpointError(f"incomplete diffusers DiT state dict: missing {e}; save the whole transformer") from None
    if config is None:
        raise CheckpointError(
            "a diffusers DiT state dict does not record its image size or heads; pass the model folder with its config.json"
        )
    grid = config.input_size // config.patch_size
    out["pos_embed"] = torch.from_numpy(sincos_pos_embed_2d(config.hidden_size, grid)).float()[None]
    return out, config


def _check_shared_embedders(sd: dict, i: int) -> None:
    if i == 0:
        return
    for suffix in ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_2.weight", "class_embedder.embedding_table.weight"):
        a, b = sd.get(_EMB.format(i=0) + suffix), sd.get(_EMB.format(i=i) + suffix)
        if b is not None and not torch.equal(a, b):
            raise CheckpointError(
                f"block {i} has its own timestep/label embedder ({suffix} differs from block 0's); "
                "ditrt supports DiT checkpoints whose blocks share one embedder, as every ported official DiT does"
            )


def official_to_diffusers(sd: dict[str, torch.Tensor], config: DiTConfig) -> dict[str, torch.Tensor]:
    """The inverse mapping (embedders copied into every block), e.g. to hand a ditrt model to diffusers."""
    out = {}
    hidden = config.hidden_size
    for i in range(config.depth):
        for off, dif in _SHARED.items():
            for p in ("weight", "bias"):
                out[f"{dif.format(i=i)}.{p}"] = sd[f"{off}.{p}"].clone()
        out[_LABELS.format(i=i)] = sd["y_embedder.embedding_table.weight"].clone()
        b = f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            for n, chunk in zip("qkv", sd[f"blocks.{i}.attn.qkv.{p}"].split(hidden)):
                out[f"{b}attn1.to_{n}.{p}"] = chunk.clone()
            for off, dif in _PER_BLOCK.items():
                out[b + dif + "." + p] = sd[f"blocks.{i}.{off}.{p}"]
    return out


def diffusers_config_dict(config: DiTConfig) -> dict:
    """A ``config.json`` for diffusers' ``DiTTransformer2DModel`` describing ``config``."""
    return {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "num_embeds_ada_norm": config.num_classes,
        "norm_eps": config.mlp_norm_eps,
        "activation_fn": "gelu-approximate",
        "norm_type": "ada_norm_zero",
    }


def config_from_diffusers(cfg: dict) -> DiTConfig:
    if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or cfg.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        raise CheckpointError("only DiTTransformer2DModel configs with ada_norm_zero and gelu-approximate are DiTs ditrt can run")
    heads, head_dim = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 72)
    in_ch = cfg.get("in_channels", 4)
    out_ch = cfg.get("out_channels") or in_ch
    if out_ch not in (in_ch, 2 * in_ch):
        raise CheckpointError(f"diffusers config has {out_ch} output channels for {in_ch} input channels; expected {2 * in_ch}")
    return DiTConfig(
        input_size=cfg.get("sample_size", 32), patch_size=cfg.get("patch_size", 2), in_channels=in_ch,
        hidden_size=heads * head_dim, depth=cfg.get("num_layers", 28), num_heads=heads,
        num_classes=cfg.get("num_embeds_ada_norm", 1000), learn_sigma=out_ch == 2 * in_ch,
        timestep_freq_shift=1, mlp_norm_eps=cfg.get("norm_eps", 1e-5),
    )  # fmt: skip
