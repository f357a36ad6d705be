"""The DiT architecture as data: :class:`DiTConfig` and the named sizes of the paper.

A config is what every artifact records about the model (recipes, ONNX metadata, sample sets), so
it lives here, below the model code: a stage that only needs the I/O shapes reads it without
importing the network.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DiTConfig:
    """Architecture hyper-parameters. ``learn_sigma`` doubles the output channels."""

    input_size: int = 32  # latent or pixel side length
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    # Ports of the official weights differ in two constants; 0 and 1e-6 are the official values.
    timestep_freq_shift: int = 0  # diffusers divides the frequency exponent by (half - 1): shift 1
    mlp_norm_eps: float = 1e-6  # diffusers' norm2 uses its config's norm_eps (1e-5 by default)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def has_null_class(self) -> bool:
        """Trained with label dropout: class ``num_classes`` is the null class guidance needs."""
        return self.class_dropout_prob > 0

    @property
    def pixel_space(self) -> bool:
        """The built-in digits model samples pixels in [-1, 1] (clipped); official DiTs sample VAE latents."""
        return self.in_channels == 1 and self.input_size == 8

    def check_guidance(self, cfg_scale: float, source) -> None:
        """Refuse classifier-free guidance for a model without a null class (its label table has no row for it)."""
        if cfg_scale != 1.0 and not self.has_null_class:
            from ditrt.contracts.errors import ConfigError

            raise ConfigError(
                f"{source} has no null class (trained without label dropout), so classifier-free guidance is impossible; "
                "pass --cfg-scale 1"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def _size(depth: int, hidden: int, heads: int):
    return dict(depth=depth, hidden_size=hidden, num_heads=heads)


_SIZES = {"S": _size(12, 384, 6), "B": _size(12, 768, 12), "L": _size(24, 1024, 16), "XL": _size(28, 1152, 16)}

#: Named configurations: the paper's twelve (DiT-{S,B,L,XL}/{2,4,8}, 256 px -> 32x32x4 latents).
CONFIGS: dict[str, DiTConfig] = {
    f"DiT-{size}/{patch}": DiTConfig(patch_size=patch, **kw) for size, kw in _SIZES.items() for patch in (2, 4, 8)
}
#: The built-in model: 8x8 handwritten digits in pixel space, patch 1 -> 64 tokens.
CONFIGS["ditrt-digits"] = DiTConfig(
    input_size=8, patch_size=1, in_channels=1, hidden_size=192, depth=6, num_heads=3, num_classes=10
)


#: The metadata key under which an exported graph (and so an engine's sidecar) records its DiTConfig as JSON.
METADATA_KEY = "ditrt.model_config"


def config_metadata(config: DiTConfig) -> dict[str, str]:
    """``{METADATA_KEY: json}``: what an exported graph records so that later stages need no model."""
    return {METADATA_KEY: json.dumps(config.to_dict(), sort_keys=True)}


def config_from_metadata(metadata: dict, source, fix: str) -> DiTConfig:
    """The DiTConfig recorded in a graph's (or an engine sidecar's) metadata; :class:`ArtifactError`
    naming ``source`` and ``fix`` when it is missing or unreadable."""
    from ditrt.contracts.errors import ArtifactError

    text = metadata.get(METADATA_KEY)
    if text is None:
        raise ArtifactError(f"{source} does not record its model config ({METADATA_KEY} metadata); {fix}")
    try:
        return DiTConfig.from_dict(json.loads(text))
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"{source} has an unreadable model config ({e}); {fix}") from None
