import pytest
import torch

from ditrt.models.checkpoints import save_ditrt_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(models, tmp_path_factory):
    """The tiny random 4-channel (DiT-XL/2-style latent) model ``models["tiny"]`` saved as a ditrt checkpoint
    (its float graph is ``exported("tiny")``, tests/conftest.py)."""
    p = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_ditrt_checkpoint(models["tiny"], p)
    return p


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A small random diffusers AutoencoderKL (4 latent channels, 2x upsampling) saved as a local folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)  # fmt: skip
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(str(path))
    return path
