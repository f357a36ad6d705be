"""Decoding VAE latents (official DiTs sample 4-channel latents) with a local diffusers AutoencoderKL.

:func:`load_vae` loads the VAE once (``ditrt sample`` once per process, however many chunks it
decodes; the pipeline once for both sample sets) and returns a :class:`VaeDecoder` to call on latents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ditrt.contracts.errors import CheckpointError, MissingDependencyError


class VaeDecoder:
    """``decoder(latents (N, 4, h, w)) -> (N, 3, 8h, 8w)`` float32 images in [-1, 1] (numpy, on the host),
    decoded on ``device`` in batches of ``batch_size`` after dividing by the VAE's scaling factor."""

    def __init__(self, vae, *, device: str, batch_size: int = 16):
        self.vae, self.device, self.batch_size = vae, str(device), int(batch_size)
        self.scale = float(getattr(vae.config, "scaling_factor", 0.18215))

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        latents = np.asarray(latents, dtype=np.float32)
        out = []
        with torch.no_grad():
            for s in range(0, len(latents), self.batch_size):
                z = torch.from_numpy(latents[s : s + self.batch_size]).to(self.device) / self.scale
                out.append(self.vae.decode(z).sample.float().clamp(-1, 1).cpu())
        return torch.cat(out).numpy()


def load_vae(vae_dir: Path, device: str = "cpu", *, batch_size: int = 16) -> VaeDecoder:
    """The AutoencoderKL in ``vae_dir`` (a diffusers folder, read offline) on ``device``, as a :class:`VaeDecoder`.

    One-line errors: :class:`CheckpointError` for a folder without config.json or that does not load,
    :class:`MissingDependencyError` without diffusers."""
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
    return VaeDecoder(vae, device=device, batch_size=batch_size)


def decode_latents(latents: np.ndarray, vae_dir: Path, *, device: str = "cpu", batch_size: int = 16) -> np.ndarray:
    """Load the VAE and decode ``latents`` once (see :func:`load_vae`); callers that decode more than one
    set load it once with :func:`load_vae` instead."""
    return load_vae(vae_dir, device, batch_size=batch_size)(latents)
