"""Layout choices of the exported graph that make ONNX Runtime faster without changing the values (issue 15)."""

import onnx
import torch
from onnx import numpy_helper

from ditrt.contracts.model_config import CONFIGS
from ditrt.export.onnx_export import export_copy
from ditrt.runtime.onnxruntime_backend import make_session
from tests.conftest import TINY, random_dit


def test_patch_embedding_is_one_matmul_over_the_patches(exported, tmp_path):
    """No Conv in the graph (ONNX Runtime would run it in its blocked layout, then reorder and transpose
    the large output): the patches are gathered from the input and multiplied by the conv weight."""
    cfg = CONFIGS["ditrt-digits"]
    path = exported("digits")
    m = onnx.load(str(path))
    assert "Conv" not in {n.op_type for n in m.graph.node}
    mm = next(n for n in m.graph.node if n.name == "x_embedder/MatMul")
    inits = {t.name: t for t in m.graph.initializer}
    w = numpy_helper.to_array(inits[mm.input[1]])
    assert w.shape == (cfg.in_channels * cfg.patch_size**2, cfg.hidden_size)
    optimized = tmp_path / "optimized.onnx"
    make_session(path, threads=1, optimized_model_path=optimized)
    ops = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    assert not ops & {"Conv", "ReorderInput", "ReorderOutput"}


def test_the_patch_matmul_computes_the_convolution():
    """Patch order, channel order and token order as the stride-p convolution has them (TINY: 2x2 patches, 4 channels)."""
    model = random_dit(TINY)
    traced = export_copy(model)
    x = torch.randn(3, TINY.in_channels, TINY.input_size, TINY.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model.x_embedder(x), traced.x_embedder(x)
    assert type(traced.x_embedder) is not type(model.x_embedder) and out.shape == ref.shape == (3, TINY.num_tokens, TINY.hidden_size)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert set(traced.state_dict()) == set(model.state_dict())  # the checkpoint's parameter names
