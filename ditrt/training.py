"""Training of ditrt's built-in assets on scikit-learn's digits: the DiT and the evaluator's classifier.

Both are reproducible (fixed seeds, fixed step counts, CPU) and are committed as safetensors under
``ditrt/models/weights``; these functions are how they were made. Regenerate with
``ditrt train dit`` and ``ditrt train classifier``.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ditrt.contracts.model_config import CONFIGS
from ditrt.data.digits import load_digits_tensors
from ditrt.diffusion.losses import hybrid_loss
from ditrt.diffusion.schedule import make_schedule
from ditrt.models.checkpoints import save_ditrt_checkpoint
from ditrt.models.dit import DiT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiTTrainConfig:
    model: str = "ditrt-digits"
    steps: int = 2000
    batch_size: int = 128
    lr: float = 3e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    seed: int = 0
    threads: int = 2
    init: str | None = None  # start from these weights (a ditrt checkpoint) instead of the random init


def train_dit(config: DiTTrainConfig, out: Path, *, progress: bool = True) -> Path:
    """Train the built-in class-conditional DiT (hybrid loss, label dropout 0.1, EMA) and save it."""
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    gen = torch.Generator().manual_seed(config.seed)
    images, labels = load_digits_tensors()
    model = DiT(CONFIGS[config.model])
    if config.init is not None:
        from ditrt.models.checkpoints import load_dit

        model.load_state_dict(load_dit(config.init).state_dict())
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    ema = copy.deepcopy(model).requires_grad_(False)
    schedule = make_schedule("1000")
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / config.warmup_steps))
    steps = range(config.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="training the built-in DiT", unit="step")
    model.train()
    start, running = time.time(), None
    for step in steps:
        idx = torch.randint(0, len(images), (config.batch_size,), generator=gen)
        loss = hybrid_loss(model, schedule, images[idx], labels[idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - config.ema_decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if progress and hasattr(steps, "set_postfix"):
            steps.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % 100 == 0:
            log.info("step %d loss %.4f (%.0f s)", step + 1, running, time.time() - start)
    # The EMA starts at the initial weights, which keep a weight of decay^steps in it (13.5% after
    # 2000 steps at 0.999). Remove that share: a bias-corrected average of the trained weights only.
    left = config.ema_decay**config.steps
    with torch.no_grad():
        for k, v in ema.state_dict().items():
            if v.is_floating_point() and k != "pos_embed":
                v.copy_((v - left * start_state[k]) / (1 - left))
    ema.eval()
    meta = {"training": asdict(config), "train_seconds": round(time.time() - start, 1), "final_loss": round(running, 5)}
    save_ditrt_checkpoint(ema, out, extra=meta)
    return out


@dataclass(frozen=True)
class ClassifierTrainConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    holdout: float = 0.2
    seed: int = 0


def train_classifier(config: ClassifierTrainConfig, out: Path) -> dict:
    """Train the evaluator's digit classifier with +-1 pixel shift augmentation; returns its
    held-out accuracy. The held-out split is the last ``holdout`` fraction of a fixed permutation."""
    from ditrt.quality.classifier import DigitsClassifier, save_classifier

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    images, labels = load_digits_tensors()
    perm = torch.randperm(len(images), generator=gen)
    n_train = int(len(images) * (1 - config.holdout))
    tr, te = perm[:n_train], perm[n_train:]
    net = DigitsClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    for _ in range(config.epochs):
        net.train()
        for b in torch.randperm(n_train, generator=gen).split(config.batch_size):
            x, y = images[tr[b]], labels[tr[b]]
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(images[te]).argmax(1) == labels[te]).float().mean().item()
    meta = {"training": asdict(config), "holdout_accuracy": round(acc, 4)}
    save_classifier(net, out, meta)
    return meta
