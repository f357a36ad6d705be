import pytest
import torch

from ditrt.contracts.model_config import DiTConfig
from ditrt.models.dit import DiT


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)  # small models: one thread avoids oversubscription when processes share 2 cores


def random_dit(config: DiTConfig, seed: int = 0, std: float = 0.05) -> DiT:
    """A DiT whose zero-initialised (adaLN-Zero) layers are randomised too, so every path matters."""
    torch.manual_seed(seed)
    m = DiT(config)
    for p in m.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=std)
    return m.eval()


TINY = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


@pytest.fixture
def tiny_dit() -> DiT:
    return random_dit(TINY)
