"""The evaluator's feature network: a small CNN trained by ditrt on scikit-learn's digits.

Its 128-d penultimate activations play the role Inception features play in FID.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ditrt.contracts.errors import CheckpointError

WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights" / "digits-classifier.safetensors"


class DigitsClassifier(nn.Module):
    """(N, 1, 8, 8) in [-1, 1] -> logits (N, 10); :meth:`features` gives (N, 128)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def save_classifier(net: DigitsClassifier, path: Path, meta: dict) -> Path:
    from safetensors.torch import save_file

    from ditrt.contracts.files import atomic_write

    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"extra": json.dumps(meta)}))


def load_classifier(path: Path = WEIGHTS) -> DigitsClassifier:
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise CheckpointError(f"classifier weights {path} are missing; regenerate them with `ditrt train classifier`")
    net = DigitsClassifier()
    net.load_state_dict(load_file(str(path)))
    return net.eval()
