"""The Inception-v3 network of FID and IS, loaded from a local TorchScript file; never downloaded.

The network is NVIDIA's ``inception-2015-12-05.pt`` from the StyleGAN2-ADA metrics release: the 2015
TensorFlow Inception graph of the original FID and IS code, translated to TorchScript with its
weights. clean-fid (``InceptionV3W``) and StyleGAN2-ADA load this file, StyleGAN3 and EDM a pickled
copy of the same network. It needs only ``torch.jit.load`` (torchvision, which pytorch-fid,
torch-fidelity and torchmetrics import, cannot be imported next to this CPU torch), and it is the
network behind published FIDs; the TensorFlow ADM evaluator runs the same graph, so numbers differ
from it only by implementation (TorchScript vs TensorFlow kernels, and how images are resized to 299).

Call convention (StyleGAN2-ADA ``metrics/``, clean-fid ``inception_torchscript.py``): the input is
an (N, 3, H, W) tensor of uint8 values, any H and W (the network resizes to 299 x 299 itself, by
bilinear grid sampling, and maps pixels to (x - 128) / 128); ``return_features=True`` gives the
(N, 2048) pool_3 features; ``no_output_bias=True`` gives the (N, 1008) softmax probabilities of the
logits *without* the output bias, which is what the TF IS code and the ADM evaluator compute
(``pool_3 @ W``, no bias).

What ditrt trusts: ``torch.jit.load`` unpickles no Python objects (a TorchScript archive holds
tensors and TorchScript code, compiled by TorchScript, not executed by Python), but the code in the
file runs on every call: use the file of the release (the sha256 of the file used is reported with
every result).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditrt import distributed
from ditrt.contracts.errors import ArtifactError, ConfigError
from ditrt.contracts.files import file_sha256

log = logging.getLogger(__name__)

ENV_VAR = "DITRT_INCEPTION"
FILE_NAME = "inception-2015-12-05.pt"
FEATURES = 2048  # pool_3
CLASSES = 1008  # the 2015 graph's softmax (1000 ImageNet classes and 8 unused)
CHUNK_BATCHES = 8  # a chunk (the unit a rank takes) is this many batches, whatever the world size
FIX = f"pass --inception FILE or set {ENV_VAR} to the StyleGAN2-ADA metrics network {FILE_NAME} (ditrt never downloads it)"


def inception_path(option: Path | None) -> Path | None:
    """The network file: ``--inception``, else ``$DITRT_INCEPTION``, else None."""
    if option is not None:
        return Path(option)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else None


@dataclass
class InceptionNetwork:
    """The loaded network on ``device``; :meth:`__call__` maps uint8 (n, 3, H, W) pixels to its two outputs."""

    module: torch.jit.ScriptModule
    path: Path
    sha256: str
    device: str

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, 3, H, W) uint8 -> ((n, 2048) pool_3 features, (n, 1008) probabilities without output bias), float32."""
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        with torch.inference_mode():
            pool = self.module(x, return_features=True)
            probs = self.module(x, no_output_bias=True)
        return pool.float().cpu().numpy(), probs.float().cpu().numpy()


def load_inception(path: Path, device: str = "cpu") -> InceptionNetwork:
    """Load and probe the network: a missing file, a file that is not TorchScript, or a network whose
    outputs on a probe batch are not (2, 2048) features and (2, 1008) probabilities is one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Inception file {path} does not exist; {FIX}")
    try:
        module = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path} is not a TorchScript archive ({first}); {FIX}") from None
    net = InceptionNetwork(module, path, file_sha256(path), str(device))
    _probe(net)
    return net


def _probe(net: InceptionNetwork) -> None:
    probe = (np.arange(2 * 3 * 37 * 41) % 256).astype(np.uint8).reshape(2, 3, 37, 41)  # an odd size: the network resizes
    try:
        pool, probs = net(probe)
    except (RuntimeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{net.path} does not take (N, 3, H, W) uint8 images with return_features/no_output_bias ({first}); {FIX}") from None
    if pool.shape != (2, FEATURES) or probs.shape != (2, CLASSES):
        raise ArtifactError(
            f"{net.path} gives features {tuple(pool.shape)} and probabilities {tuple(probs.shape)} for 2 images, "
            f"not (2, {FEATURES}) and (2, {CLASSES}); {FIX}"
        )
    if not (np.isfinite(pool).all() and np.isfinite(probs).all() and np.allclose(probs.sum(1), 1, atol=1e-3)):
        raise ArtifactError(f"{net.path} gives non-finite features or probabilities that do not sum to 1 on a probe batch; {FIX}")


@dataclass
class InceptionOutputs:
    """The network's outputs for every image of a set, in image order."""

    pool: np.ndarray  # (N, 2048) float32 pool_3 features (FID, precision/recall)
    probs: np.ndarray  # (N, 1008) float32 class probabilities without output bias (IS)


def inception_outputs(net: InceptionNetwork, images, *, world=distributed.SINGLE, batch_size: int = 100,
                      progress: bool = False, what: str = "images") -> InceptionOutputs:  # fmt: skip
    """Both outputs for every image of ``images`` (a :class:`ditrt.quality.image_sets.ImageSet`).

    The set is cut into chunks of ``CHUNK_BATCHES * batch_size`` images, each run as the same
    consecutive batches whatever the world size; rank r takes chunks r, r + size, ... and every rank
    gets the whole result in image order, so 1 or N processes give the same numbers."""
    plan = distributed.chunk_ranges(len(images), CHUNK_BATCHES * batch_size)
    mine = distributed.my_chunks(len(plan), world)
    bar = None
    if progress and world.is_main:
        from tqdm.auto import tqdm

        share = "" if world.size == 1 else f", this rank's {len(mine)} of {len(plan)} chunks"
        bar = tqdm(total=sum(len(plan[k]) for k in mine), desc=f"Inception on {len(images)} {what}{share}", unit="image")
    done = {}
    for k in mine:
        parts = []
        for rows in distributed.chunk_ranges(len(plan[k]), batch_size):
            parts.append(net(images.uint8(range(plan[k].start + rows.start, plan[k].start + rows.stop))))
            if bar:
                bar.update(len(rows))
        done[k] = (np.concatenate([p for p, _ in parts]), np.concatenate([q for _, q in parts]))
    if bar:
        bar.close()
    merged = {k: v for part in distributed.all_gather_objects(done, world) for k, v in part.items()}
    return InceptionOutputs(np.concatenate([merged[k][0] for k in range(len(plan))]), np.concatenate([merged[k][1] for k in range(len(plan))]))
