import os
import subprocess
import sys

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


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """A tiny random 4-channel (DiT-XL/2-style latent) model as every artifact a user opens: a ditrt
    checkpoint, a W8A8 recipe folder (absmax scales) and an exported float graph. Read-only for tests."""
    from ditrt.contracts.recipe import save_recipe
    from ditrt.export import export_onnx
    from ditrt.models.checkpoints import save_ditrt_checkpoint
    from tests.export.recipes import absmax_recipe

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("artifacts")
    model = random_dit(TINY)
    save_ditrt_checkpoint(model, root / "m.safetensors")
    recipe, tensors = absmax_recipe(model, "w8a8")
    save_recipe(recipe, tensors, root / "recipe")
    return {"model": model, "root": root, "ckpt": root / "m.safetensors", "recipe": root / "recipe", "onnx": export_onnx(model, root / "m.onnx")}


def run_torchrun(nproc: int, *ditrt_args, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m ditrt ARGS`` (a free local rendezvous; gloo on the CPU), one
    thread per process, with no torchrun variables inherited from the test process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "ditrt", *map(str, ditrt_args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**env, "OMP_NUM_THREADS": "1"})
