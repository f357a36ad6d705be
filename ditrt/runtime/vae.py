"""Decoding VAE latents (official DiTs sample 4-channel latents) with a local diffusers AutoencoderKL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ditrt.contracts.errors import CheckpointError, MissingDependencyError


def decode_latents(latents: np.ndarray, vae_dir: Path, *, device: str = "cpu", batch_size: int = 16) -> np.ndarray:
    """(N, 4, h, w) latents -> (N, 3, 8h, 8w) images in [-1, 1], with the VAE's scaling factor."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise MissingDependencyError("decoding latents needs diffusers: pip install diffusers") from None
    vae_dir = Path(vae_dir)
    if not (vae_dir / "config.json").exists():
        raise CheckpointError(f"{vae_dir} is not a diffusers AutoencoderKL folder (no config.json); pass e.g. a local sd-vae-ft-ema copy")
    try:
        vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).to(device).eval()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not load the VAE from {vae_dir} ({str(e).splitlines()[0]}); check the folder") from None
    scale = float(getattr(vae.config, "scaling_factor", 0.18215))
    out = []
    with torch.no_grad():
        for s in range(0, len(latents), batch_size):
            z = torch.from_numpy(latents[s : s + batch_size]).to(device) / scale
            out.append(vae.decode(z).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out).numpy()
