import dataclasses
import json
import logging
import os
import pickle

import pytest
import torch

from ditrt.contracts.errors import CheckpointError
from ditrt.contracts.files import state_dict_hash
from ditrt.contracts.model_config import CONFIGS
from ditrt.models import diffusers_compat
from ditrt.models.checkpoints import load_dit, save_ditrt_checkpoint
from tests.conftest import TINY, random_dit


def _inputs(cfg, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    return x, torch.tensor([0.0, 421.0, 999.0])[:n], torch.tensor([0, 7, cfg.num_classes])[:n]


@pytest.mark.parametrize("wrap", [None, "ema", "model"])
def test_official_pt_loads_with_weights_only(tmp_path, wrap):
    m = random_dit(TINY)
    sd = m.state_dict()
    torch.save({wrap: sd} if wrap else sd, tmp_path / "ckpt.pt")
    loaded = load_dit(tmp_path / "ckpt.pt", config=TINY)  # 64 wide: no named config gives the head count
    x, t, y = _inputs(TINY)
    assert loaded.config.depth == 2 and loaded.config.num_classes == 10
    assert torch.equal(loaded(x, t, y), m(x, t, y))


def test_ditrt_safetensors_round_trip_keeps_config_and_hash(tmp_path):
    m = random_dit(TINY)
    save_ditrt_checkpoint(m, tmp_path / "m.safetensors", extra={"note": "x"})
    loaded = load_dit(tmp_path / "m.safetensors")
    assert loaded.config == TINY
    assert state_dict_hash(loaded) == state_dict_hash(m)
    assert oct((tmp_path / "m.safetensors").stat().st_mode & 0o777) != "0o600"


def test_dit_s2_official_and_diffusers_layouts_give_identical_outputs(tmp_path):
    """A random DiT-S/2 saved in both layouts; diffusers' own model is the reference."""
    from diffusers import DiTTransformer2DModel

    cfg = CONFIGS["DiT-S/2"]
    m = random_dit(cfg, std=0.02)
    torch.save(m.state_dict(), tmp_path / "official.pt")

    dcfg = {k: v for k, v in diffusers_compat.diffusers_config_dict(cfg).items() if not k.startswith("_")}
    ref = DiTTransformer2DModel(**{**dcfg, "norm_eps": 1e-6}).eval()
    ref.load_state_dict(diffusers_compat.official_to_diffusers(m.state_dict(), cfg))
    ref.save_pretrained(tmp_path / "diffusers")

    official = load_dit(tmp_path / "official.pt")
    from_diffusers = load_dit(tmp_path / "diffusers")
    x, t, y = _inputs(cfg)
    with torch.no_grad():
        expected = ref(x, timestep=t, class_labels=y).sample
        # diffusers' timestep embedding divides by (half - 1): its port is exact with that constant
        assert (from_diffusers(x, t, y) - expected).abs().max() <= 1e-5
        # the official layout, read back, is the model that was saved
        assert (official(x, t, y) - m(x, t, y)).abs().max() == 0
        # and both loaders agree on every weight
        for k, v in official.state_dict().items():
            assert torch.equal(v, from_diffusers.state_dict()[k]), k


def test_diffusers_model_with_untied_block_embedders_is_refused(tmp_path):
    from diffusers import DiTTransformer2DModel

    dcfg = {k: v for k, v in diffusers_compat.diffusers_config_dict(TINY).items() if not k.startswith("_")}
    torch.manual_seed(0)
    DiTTransformer2DModel(**dcfg).save_pretrained(tmp_path / "d")  # fresh model: every block draws its own embedder
    with pytest.raises(CheckpointError, match="own timestep/label embedder"):
        load_dit(tmp_path / "d")


def test_truncated_file_is_refused(tmp_path):
    torch.save(random_dit(TINY).state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_dit(tmp_path / "cut.pt")
    save_ditrt_checkpoint(random_dit(TINY), tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_dit(tmp_path / "cut.safetensors")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": random_dit(TINY).state_dict(), "evil": _RunsCode(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        load_dit(tmp_path / "evil.pt")
    assert not marker.exists()
    # a legacy (non-zip) pickle is refused before unpickling anything
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps(_RunsCode(str(marker))))
    with pytest.raises(CheckpointError, match="legacy pickle"):
        load_dit(tmp_path / "legacy.pt")
    assert not marker.exists()


def test_head_count_is_inferred_for_named_widths_and_asked_for_otherwise(tmp_path):
    cfg = CONFIGS["DiT-S/8"]
    torch.save(random_dit(cfg).state_dict(), tmp_path / "s8.pt")
    assert load_dit(tmp_path / "s8.pt").config == cfg
    torch.save(random_dit(TINY).state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match="head count.*--config"):
        load_dit(tmp_path / "tiny.pt")


def test_foreign_state_dict_is_refused_naming_keys(tmp_path):
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match="not a DiT checkpoint.*conv1.weight"):
        load_dit(tmp_path / "resnet.pt")


def test_wrong_architecture_names_the_first_mismatched_shapes(tmp_path):
    torch.save(random_dit(TINY).state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError) as e:
        load_dit(tmp_path / "tiny.pt", config="DiT-S/2")
    msg = str(e.value)
    assert "shape mismatch" in msg and "pos_embed (1, 16, 64) vs (1, 256, 384)" in msg and "\n" not in msg


def test_missing_file_and_bad_diffusers_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dit(tmp_path / "nope.pt")
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_dit(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps({"norm_type": "ada_norm_zero"}))
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model"):
        load_dit(tmp_path / "d")
    assert os.listdir(tmp_path / "d") == ["config.json"]


# ------------------------------------------------------------------ label rows, head count, non-finite weights
NO_NULL = dataclasses.replace(TINY, class_dropout_prob=0.0)  # trained without label dropout: exactly 10 label rows


def test_a_checkpoint_without_a_null_class_keeps_every_class(tmp_path, caplog):
    """The official LabelEmbedder has num_classes + (dropout_prob > 0) rows; 10 rows are 10 classes, not 9."""
    m = random_dit(NO_NULL)
    assert m.y_embedder.embedding_table.weight.shape[0] == 10
    torch.save(m.state_dict(), tmp_path / "nonull.pt")
    with caplog.at_level(logging.WARNING, logger="ditrt.models.checkpoints"):
        loaded = load_dit(tmp_path / "nonull.pt", num_heads=4)
    assert loaded.config.num_classes == 10 and loaded.config.class_dropout_prob == 0.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no null-class row" in warnings[0] and "guidance is impossible" in warnings[0], warnings
    x, t, y = _inputs(NO_NULL)
    y = torch.tensor([0, 7, 9])  # the last class, which rows - 1 would have dropped
    assert torch.equal(loaded(x, t, y), m(x, t, y))


def test_a_named_config_gives_the_classes_and_fits_the_null_row_to_the_table(tmp_path, caplog):
    """--config DiT-S/8 means 1000 classes: a table of 1000 rows has no null class, one of 1001 rows has it."""
    cfg = CONFIGS["DiT-S/8"]
    for rows, dropout in ((1001, 0.1), (1000, 0.0)):
        m = random_dit(dataclasses.replace(cfg, class_dropout_prob=dropout))
        assert m.y_embedder.embedding_table.weight.shape[0] == rows
        torch.save(m.state_dict(), tmp_path / "s8.pt")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ditrt.models.checkpoints"):
            loaded = load_dit(tmp_path / "s8.pt", config="DiT-S/8")
        assert loaded.config == dataclasses.replace(cfg, class_dropout_prob=dropout)
        said = [r.getMessage() for r in caplog.records]
        assert (rows == 1000) == any("no null-class row" in w for w in said), said


def test_without_options_the_assumed_heads_and_classes_are_said_once(tmp_path, caplog):
    cfg = CONFIGS["DiT-S/8"]
    torch.save(random_dit(cfg).state_dict(), tmp_path / "s8.pt")
    with caplog.at_level(logging.WARNING, logger="ditrt.models.checkpoints"):
        assert load_dit(tmp_path / "s8.pt").config == cfg
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1, said
    assert "6 heads (those of DiT-S/" in said[0] and "1000 classes and a null-class row" in said[0]
    assert "--num-heads" in said[0] and "--num-classes" in said[0] and "\n" not in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ditrt.models.checkpoints"):  # nothing left to assume: silent
        assert load_dit(tmp_path / "s8.pt", num_heads=6, num_classes=1000).config == cfg
    assert not caplog.records


def test_explicit_heads_and_classes_override_and_contradictions_are_refused(tmp_path):
    torch.save(random_dit(TINY).state_dict(), tmp_path / "tiny.pt")  # 10 classes + null row, hidden 64, 4 heads
    loaded = load_dit(tmp_path / "tiny.pt", num_heads=4, num_classes=10)
    assert loaded.config == TINY
    assert load_dit(tmp_path / "tiny.pt", num_heads=4, num_classes=11).config.class_dropout_prob == 0.0  # 11 rows, no null
    with pytest.raises(CheckpointError, match=r"11 label-embedding rows, but 5 classes.*--num-classes 10"):
        load_dit(tmp_path / "tiny.pt", num_heads=4, num_classes=5)
    with pytest.raises(CheckpointError, match="--num-heads 5 does not divide the hidden size 64"):
        load_dit(tmp_path / "tiny.pt", num_heads=5, num_classes=10)
    with pytest.raises(CheckpointError, match="--num-heads must be a positive integer"):
        load_dit(tmp_path / "tiny.pt", num_heads=0)
    # the head count changes the model's output: the option is really used
    x, t, y = _inputs(TINY)
    two = load_dit(tmp_path / "tiny.pt", num_heads=2, num_classes=10)
    assert two.config.num_heads == 2 and not torch.allclose(two(x, t, y), loaded(x, t, y))


def test_options_are_refused_where_the_file_states_the_config(tmp_path):
    from ditrt.models.builtin import load_model

    with pytest.raises(CheckpointError, match="built-in model records its own config; drop --num-classes"):
        load_model("builtin", num_classes=10)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="diffusers folder.*drop --config"):
        load_dit(tmp_path / "d", num_heads=4)


def _poison(sd: dict, key: str, value: float) -> dict:
    sd = {k: v.clone() for k, v in sd.items()}
    sd[key].view(-1)[3] = value
    return sd


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_in_every_format(tmp_path, value):
    from diffusers import DiTTransformer2DModel
    from safetensors.torch import save_file

    m = random_dit(TINY)
    bad = _poison(m.state_dict(), "blocks.1.mlp.fc2.weight", value)
    torch.save(bad, tmp_path / "bad.pt")
    save_file(bad, str(tmp_path / "bad.safetensors"))
    m.load_state_dict(bad)
    save_ditrt_checkpoint(m, tmp_path / "bad.ditrt.safetensors")
    dcfg = {k: v for k, v in diffusers_compat.diffusers_config_dict(TINY).items() if not k.startswith("_")}
    ref = DiTTransformer2DModel(**dcfg)
    ref.load_state_dict(diffusers_compat.official_to_diffusers(bad, TINY))
    ref.save_pretrained(tmp_path / "diffusers")
    for path, key in [("bad.pt", "blocks.1.mlp.fc2.weight"), ("bad.safetensors", "blocks.1.mlp.fc2.weight"),
                      ("bad.ditrt.safetensors", "blocks.1.mlp.fc2.weight"), ("diffusers", "transformer_blocks.1.ff.net.2.weight")]:  # fmt: skip
        with pytest.raises(CheckpointError) as e:
            load_dit(tmp_path / path, **({} if path == "diffusers" else {"config": TINY}))
        msg = str(e.value)
        assert f"NaN or infinite values in {key}" in msg and "re-download" in msg and "\n" not in msg, msg
