"""The PyTorch denoiser: a DiT (float or simulated-quantized) on CPU or CUDA, and its opener."""

from __future__ import annotations

from pathlib import Path

import torch

from ditrt.contracts.errors import ArtifactError, ConfigError


class TorchDenoiser:
    """``(x, t, y) -> output`` in float32 on ``x``'s device, running ``model`` in ``dtype`` on ``device``."""

    def __init__(self, model: torch.nn.Module, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(x.to(self.device, self.dtype), t.to(self.device), y.to(self.device)).float()
        return out.to(x.device)  # a no-op when x is already on the model's device


def open_torch(artifact, *, device: str = "cpu", model=None, config_name: str | None = None, num_classes: int | None = None,
               num_heads: int | None = None, dtype: torch.dtype = torch.float32):
    """:class:`~ditrt.runtime.open.OpenDenoiser` for a checkpoint (the float model) or a recipe folder
    (the simulated quantized model, built from the recipe alone or checked against ``model``)."""
    from ditrt.runtime.open import OpenDenoiser, is_recipe_folder

    if is_recipe_folder(artifact):
        given = [flag for flag, v in (("--config", config_name), ("--num-classes", num_classes), ("--num-heads", num_heads)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} applies to a checkpoint; a recipe records its model config: drop it")
        net, precision = _recipe_model(Path(artifact), model)
    else:
        if model is not None:
            raise ConfigError(f"{artifact} is a checkpoint: sample it directly, or pass it as --model only beside a --recipe")
        net, precision = _checkpoint_model(artifact, config=config_name, num_classes=num_classes, num_heads=num_heads), "fp32"
    return OpenDenoiser(TorchDenoiser(net, device=device, dtype=dtype), net.config, "torch", str(artifact), precision, model=net,
                        device=str(device))  # fmt: skip


def _checkpoint_model(spec, **load_options):
    from ditrt.models.builtin import load_model

    return load_model(spec, **load_options)


def _recipe_model(recipe_dir: Path, model):
    """The simulated model of ``recipe_dir`` and its precision; ``model`` (a spec or a DiT) is checked, not needed."""
    from ditrt.contracts.files import state_dict_hash
    from ditrt.contracts.model_config import DiTConfig
    from ditrt.contracts.recipe import check_recipe_matches, folded_state, load_recipe
    from ditrt.models.dit import DiT
    from ditrt.models.quantized import quantized_model

    recipe, tensors = load_recipe(recipe_dir)
    if model is not None:
        source = "the given model" if isinstance(model, torch.nn.Module) else str(model)
        base = model if isinstance(model, torch.nn.Module) else _checkpoint_model(model)
        check_recipe_matches(recipe, state_dict_hash(base), source)
    elif not folded_state(tensors):
        raise ArtifactError(f"{recipe_dir} holds no model weights (made by an older ditrt); pass --model with the checkpoint it was made from")
    else:
        base = DiT(DiTConfig.from_dict(recipe.model_config))  # every weight is replaced by the recipe's folded state
    return quantized_model(base, recipe, tensors), recipe.precision
