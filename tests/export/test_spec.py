import pytest
import torch

from ditrt.contracts.errors import InputError
from ditrt.contracts.model_config import CONFIGS
from ditrt.contracts.spec import DiTSpec
from ditrt.export.onnx_export import export_copy


def test_shapes_and_sample_inputs():
    spec = DiTSpec(CONFIGS["ditrt-digits"])
    assert spec.input_shapes(3) == {"x": (3, 1, 8, 8), "t": (3,), "y": (3,)}
    assert spec.output_shape(3) == (3, 2, 8, 8)
    x, t, y = spec.sample_inputs(64)
    assert x.dtype == t.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= float(t.min()) and float(t.max()) <= 999 and 0 <= int(y.min()) and int(y.max()) <= 10
    assert torch.equal(spec.sample_inputs(4, seed=1)[0], spec.sample_inputs(4, seed=1)[0])


def test_check_inputs_names_the_bad_input():
    spec = DiTSpec(CONFIGS["ditrt-digits"])
    x, t, y = spec.sample_inputs(2)
    assert spec.check_inputs(x, t, y) == 2
    with pytest.raises(InputError, match=r"x must have shape \(batch, 1, 8, 8\)"):
        spec.check_inputs(x[:, :, :4], t, y)
    with pytest.raises(InputError, match="y must have shape"):
        spec.check_inputs(x, t, y[:1])


def test_traced_copy_computes_exactly_what_the_model_computes(models):
    """The exported module carries its own timestep frequencies (see export_copy): bit-identical."""
    m = models["digits"]
    x, t, y = DiTSpec(m.config).sample_inputs(5)
    t[0] = 999.0
    with torch.no_grad():
        assert torch.equal(export_copy(m)(x, t, y), m(x, t, y))


def test_float16_copy_keeps_float32_boundary_and_layernorm(models):
    m = models["tiny"]
    h = export_copy(m, "fp16")
    assert h.blocks[0].attn.qkv.weight.dtype == torch.float16
    assert h.t_embedder.freqs.dtype == torch.float32 and h.pos_embed.dtype == torch.float16
    x, t, y = DiTSpec(m.config).sample_inputs(3)
    with torch.no_grad():
        out, ref = h(x, t, y), m(x, t, y)
    assert out.dtype == torch.float32
    assert float((out - ref).norm() / ref.norm()) < 2e-3
    assert m.blocks[0].attn.qkv.weight.dtype == torch.float32  # the caller's model is untouched
