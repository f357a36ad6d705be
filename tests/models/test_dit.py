import numpy as np
import pytest
import torch

from ditrt.contracts.errors import ConfigError
from ditrt.contracts.model_config import CONFIGS
from ditrt.models.dit import DiT, build_model, sincos_pos_embed_2d, timestep_embedding
from tests.conftest import TINY, random_dit


def test_registry_has_the_papers_twelve_configs_and_the_builtin():
    for size in ["S", "B", "L", "XL"]:
        for patch in (2, 4, 8):
            assert f"DiT-{size}/{patch}" in CONFIGS
    xl = CONFIGS["DiT-XL/2"]
    assert (xl.depth, xl.hidden_size, xl.num_heads, xl.head_dim, xl.num_tokens) == (28, 1152, 16, 72, 256)
    b = CONFIGS["ditrt-digits"]
    assert b.depth >= 6 and b.hidden_size >= 192 and b.num_tokens >= 64 and b.learn_sigma


def test_unknown_config_is_a_user_error():
    with pytest.raises(ConfigError, match="DiT-XL/2"):
        build_model("DiT-XXL/2")


def test_official_parameter_names_and_shapes():
    sd = DiT(TINY).state_dict()
    d = TINY.hidden_size
    expected = {
        "pos_embed": (1, 16, d),
        "x_embedder.proj.weight": (d, 4, 2, 2),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.2.weight": (d, d),
        "y_embedder.embedding_table.weight": (11, d),  # 10 classes + null class
        "blocks.0.attn.qkv.weight": (3 * d, d),
        "blocks.0.attn.proj.weight": (d, d),
        "blocks.0.mlp.fc1.weight": (4 * d, d),
        "blocks.0.mlp.fc2.weight": (d, 4 * d),
        "blocks.0.adaLN_modulation.1.weight": (6 * d, d),
        "final_layer.linear.weight": (2 * 2 * 8, d),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any("norm" in k for k in sd)  # LayerNorms have no affine parameters


def test_forward_shape_and_learned_sigma_channels(tiny_dit):
    x = torch.randn(3, 4, 8, 8)
    out = tiny_dit(x, torch.tensor([0.0, 10.0, 999.0]), torch.tensor([0, 5, 10]))
    assert out.shape == (3, 8, 8, 8)


def test_adaln_zero_init_outputs_zero():
    m = DiT(TINY).eval()
    out = m(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0


def test_pos_embed_is_the_2d_sincos_table():
    m = DiT(TINY)
    table = sincos_pos_embed_2d(TINY.hidden_size, 4)
    assert np.allclose(m.pos_embed[0].numpy(), table, atol=1e-6)
    assert not m.pos_embed.requires_grad
    # token (row 0, col 1): the first half encodes the column, so sin(1 * omega_0) = sin(1)
    assert table[1, 0] == pytest.approx(np.sin(1.0)) and table[1, TINY.hidden_size // 2] == pytest.approx(0.0)


def test_timestep_embedding_is_cos_then_sin():
    e = timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    assert torch.allclose(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert e[1, 0] == pytest.approx(np.cos(3.0)) and e[1, 4] == pytest.approx(np.sin(3.0))


def test_label_dropout_only_in_training():
    m = random_dit(TINY)
    y = torch.zeros(4000, dtype=torch.long)
    m.train()
    dropped = (m.y_embedder(y) == m.y_embedder.embedding_table.weight[10]).all(1).float().mean()
    assert 0.07 < dropped < 0.13
    m.eval()
    assert not (m.y_embedder(y) == m.y_embedder.embedding_table.weight[10]).all(1).any()


def test_attention_matches_torch_sdpa(tiny_dit):
    attn = tiny_dit.blocks[0].attn
    x = torch.randn(2, 16, 64)
    qkv = attn.qkv(x).reshape(2, 16, 3, 4, 16).permute(2, 0, 3, 1, 4)
    ref = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(2, 16, 64)
    assert torch.allclose(attn(x), attn.proj(ref), atol=1e-5)
