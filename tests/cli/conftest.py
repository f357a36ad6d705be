import pytest

from ditrt.models.checkpoints import save_ditrt_checkpoint
from tests.conftest import TINY, random_dit


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random 4-channel (DiT-XL/2-style latent) model saved as a ditrt checkpoint."""
    p = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_ditrt_checkpoint(random_dit(TINY), p)
    return p
