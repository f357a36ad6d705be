import os
import shutil
import subprocess
import sys

import pytest
import torch

from ditrt.contracts.model_config import CONFIGS, DiTConfig
from ditrt.diffusion.sampler import SamplerConfig
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


#: The random DiTs every test folder shares (:func:`random_dit`, seed 0): TINY and the built-in model's shape.
SHARED = {"tiny": TINY, "digits": CONFIGS["ditrt-digits"]}


@pytest.fixture(scope="session")
def models() -> dict[str, DiT]:
    """name -> a random DiT of :data:`SHARED` (read-only: tests that change weights make their own)."""
    return {name: random_dit(cfg) for name, cfg in SHARED.items()}


@pytest.fixture(scope="session")
def recipes(models):
    """(model name, precision) -> (recipe, tensors), absmax scales, every Linear quantized; made once."""
    from tests.export.recipes import absmax_recipe

    cache = {}

    def get(name: str, precision: str):
        if (name, precision) not in cache:
            cache[name, precision] = absmax_recipe(models[name], precision)
        return cache[name, precision]

    return get


@pytest.fixture(scope="session")
def exported(models, recipes, tmp_path_factory):
    """(model name, precision, dtype) -> path of the exported graph, precision "float" or a recipe's;
    each graph is exported once per session (seconds each) and is read-only for tests."""
    from ditrt.export import export_onnx

    cache = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(name: str, precision: str = "float", dtype: str = "fp32"):
        key = (name, precision, dtype)
        if key not in cache:
            torch.set_num_threads(1)
            kw = {} if precision == "float" else dict(zip(("recipe", "tensors"), recipes(name, precision)))
            cache[key] = export_onnx(models[name], root / f"{name}-{precision}-{dtype}.onnx", dtype=dtype, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_artifacts(models, recipes, exported, tmp_path_factory):
    """The tiny random 4-channel (DiT-XL/2-style latent) model as every artifact a user opens, in one
    folder: a ditrt checkpoint, a W8A8 recipe folder (absmax scales) and its float graph (a copy of
    ``exported("tiny")``). Read-only for tests."""
    from ditrt.contracts.recipe import save_recipe
    from ditrt.models.checkpoints import save_ditrt_checkpoint

    root = tmp_path_factory.mktemp("artifacts")
    model = models["tiny"]
    save_ditrt_checkpoint(model, root / "m.safetensors")
    save_recipe(*recipes("tiny", "w8a8"), root / "recipe")
    shutil.copyfile(exported("tiny"), root / "m.onnx")
    return {"model": model, "root": root, "ckpt": root / "m.safetensors", "recipe": root / "recipe", "onnx": root / "m.onnx"}


@pytest.fixture(scope="session")
def digits_ckpt(models, tmp_path_factory):
    """``models["digits"]`` (the built-in model's shape, random weights) saved as a ditrt checkpoint; its
    float graph is ``exported("digits")``."""
    from ditrt.models.checkpoints import save_ditrt_checkpoint

    path = tmp_path_factory.mktemp("digits") / "digits.safetensors"
    save_ditrt_checkpoint(models["digits"], path)
    return path


#: How the tests that judge the built-in model's samples sample it (as ``ditrt sample builtin --steps 50``).
BUILTIN_SAMPLER = SamplerConfig(steps="50", cfg_scale=1.5, clip_denoised=True)


@pytest.fixture(scope="session")
def builtin_samples() -> dict:
    """The trained built-in model's float samples, made once: 60 images (60, 1, 8, 8) under
    :data:`BUILTIN_SAMPLER`, sample i of label i % 10 from seed i (the quality test judges all of them,
    the export parity test pairs the first ten with the graph's)."""
    from ditrt.diffusion.sample_set import generate
    from ditrt.models.builtin import load_model

    torch.set_num_threads(1)
    labels, seeds = [i % 10 for i in range(60)], list(range(60))
    images = generate(load_model("builtin"), BUILTIN_SAMPLER, labels, seeds, num_classes=10, image_shape=(1, 8, 8))
    return {"labels": labels, "seeds": seeds, "images": images}


def run_torchrun(nproc: int, *ditrt_args, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m ditrt ARGS`` (a free local rendezvous; gloo on the CPU), one
    thread per process, with no torchrun variables inherited from the test process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "ditrt", *map(str, ditrt_args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**env, "OMP_NUM_THREADS": "1"})
