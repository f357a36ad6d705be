"""Helpers shared by the export and runtime tests: absmax recipes made in the test, ONNX sessions."""

from __future__ import annotations

import torch
from torch import nn

from ditrt.contracts.files import state_dict_hash
from ditrt.contracts.precisions import PRECISIONS
from ditrt.contracts.recipe import Recipe
from ditrt.contracts.spec import DiTSpec


def linear_names(model: nn.Module, quantize_all: bool = True) -> list[str]:
    """Every Linear (adaLN, timestep MLP and final layer included), or only the blocks' four."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names if quantize_all else [n for n in names if n.split(".")[-1] in ("qkv", "proj", "fc1", "fc2")]


def absmax_recipe(
    model, precision: str, *, quantize_all: bool = True, block_size: int = 64, symmetric: bool = True, seed: int = 0
):
    """A recipe with plain absmax scales: weights per output channel (w8a8) or per block of the input
    dimension (w4a16), inputs per tensor over three random batches."""
    p = PRECISIONS[precision]
    wbits, abits, gran = p.weight_bits, p.act_bits, p.weight_granularity
    qmax_w, qmax_a = 2 ** (wbits - 1) - 1, 127
    layers = linear_names(model, quantize_all)
    absmax = dict.fromkeys(layers, 0.0)

    def record(name):
        return lambda mod, args: absmax.__setitem__(name, max(absmax[name], float(args[0].abs().max())))

    hooks = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in layers]
    with torch.no_grad():
        for s in range(3):
            model(*DiTSpec(model.config).sample_inputs(4, seed=100 + seed + s))
    for h in hooks:
        h.remove()
    tensors = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for name in layers:
        w = model.get_submodule(name).weight.detach()
        groups = w if gran == "channel" else w.reshape(w.shape[0], -1, block_size)
        tensors[f"quant.{name}.weight_scale"] = groups.abs().amax(dim=-1) / qmax_w  # (out,) or (out, in // block)
        if abits:
            tensors[f"quant.{name}.input_scale"] = torch.tensor(absmax[name] / qmax_a)
        if not symmetric:
            tensors[f"quant.{name}.weight_zero_point"] = torch.zeros_like(tensors[f"quant.{name}.weight_scale"])
    recipe = Recipe(
        method="minmax",
        precision=precision,
        layers=tuple(layers),
        model_hash=state_dict_hash(model),
        model_config=model.config.to_dict(),
        weight_bits=wbits,
        act_bits=abits,
        weight_granularity=gran,
        block_size=block_size if gran == "block" else None,
        symmetric=symmetric,
        scale_search="minmax",
        act_scale_search="minmax",
    )
    return recipe, tensors


def rel_l2(a, b) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


def ort_session(path, *, optimized_model_path=None):
    """A one-thread session with the ONNX Runtime denoiser's settings (int8/int4 fusions on, exact)."""
    from ditrt.runtime.onnxruntime_backend import make_session

    return make_session(path, threads=1, optimized_model_path=optimized_model_path)


def run(session, x, t, y) -> torch.Tensor:
    return torch.from_numpy(session.run(["out"], {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})[0])
