"""open_denoiser: the artifact picks the backend and the model config; ignored options are refused."""

import json

import onnx
import pytest
import torch

from ditrt.contracts.errors import ArtifactError, ConfigError, MissingDependencyError
from ditrt.contracts.groups import read_artifact, write_manifest
from ditrt.contracts.spec import DiTSpec
from ditrt.runtime.groups import TimestepGroupDenoiser
from ditrt.runtime.open import BACKENDS, artifact_backend, open_denoiser
from tests.conftest import TINY, random_dit
from tests.export.recipes import rel_l2


@pytest.fixture(scope="module")
def art(tiny_artifacts):
    """Every artifact of the tiny 4-channel DiT (tests/conftest.py), plus a two-group graph manifest."""
    root, graph = tiny_artifacts["root"], tiny_artifacts["onnx"]
    (root / "g.g0.onnx").write_bytes(graph.read_bytes())
    (root / "g.g1.onnx").write_bytes(graph.read_bytes())
    manifest = write_manifest(root / "g.onnx", (500.0,), [root / "g.g0.onnx", root / "g.g1.onnx"], "onnx")
    return {**tiny_artifacts, "manifest": manifest}


def test_the_artifact_picks_the_backend(art, tmp_path):
    (tmp_path / "e.g0.plan").touch()
    engines = write_manifest(tmp_path / "e.plan", (), [tmp_path / "e.g0.plan"], "tensorrt")
    assert artifact_backend("builtin") == artifact_backend(art["ckpt"]) == artifact_backend(art["recipe"]) == "torch"
    assert artifact_backend(art["onnx"]) == artifact_backend(art["manifest"]) == "onnxruntime"
    assert artifact_backend(tmp_path / "m.plan") == artifact_backend(tmp_path / "m.engine") == artifact_backend(engines) == "tensorrt"
    assert set(BACKENDS) == {"torch", "onnxruntime", "tensorrt"}


def test_a_single_file_is_a_one_group_manifest(art, tmp_path):
    assert read_artifact(art["onnx"]) == ("onnx", (), [art["onnx"]])
    assert read_artifact(art["manifest"]) == ("onnx", (500.0,), [art["root"] / "g.g0.onnx", art["root"] / "g.g1.onnx"])
    (tmp_path / "m.plan").write_bytes(b"x")
    assert read_artifact(tmp_path / "m.plan") == ("tensorrt", (), [tmp_path / "m.plan"])
    with pytest.raises(ConfigError, match="is not an ONNX graph"):
        read_artifact(tmp_path / "m.txt")
    with pytest.raises(ArtifactError, match="does not exist; create it with `ditrt export`"):
        read_artifact(tmp_path / "missing.onnx")


def test_a_graph_opens_with_its_own_config_and_matches_torch(art):
    opened = open_denoiser(art["onnx"])
    assert (opened.backend, opened.config, opened.precision, opened.max_rows, opened.model) == ("onnxruntime", TINY, "fp32", None, None)
    assert isinstance(opened.denoiser, TimestepGroupDenoiser) and len(opened.denoiser.denoisers) == 1
    x, t, y = DiTSpec(TINY).sample_inputs(3, seed=2)
    with torch.no_grad():
        assert rel_l2(opened.denoiser(x, t, y), art["model"](x, t, y)) <= 1e-5


def test_a_graph_manifest_sends_each_timestep_to_its_group(art):
    opened = open_denoiser(art["manifest"])
    calls = []

    def counted(i, d):
        return lambda x, t, y: calls.append(i) or d(x, t, y)

    opened.denoiser.denoisers = [counted(i, d) for i, d in enumerate(opened.denoiser.denoisers)]
    x, _, y = DiTSpec(TINY).sample_inputs(2, seed=2)
    opened.denoiser(x, torch.tensor([900.0, 800.0]), y)
    opened.denoiser(x, torch.tensor([10.0, 20.0]), y)
    assert calls == [0, 1] and opened.config == TINY


def test_a_recipe_samples_without_its_model_and_equals_the_checked_one(art):
    alone = open_denoiser(art["recipe"])
    checked = open_denoiser(art["recipe"], model=art["ckpt"])
    assert alone.precision == checked.precision == "w8a8" and alone.config == TINY
    x, t, y = DiTSpec(TINY).sample_inputs(3, seed=4)
    assert torch.equal(alone.denoiser(x, t, y), checked.denoiser(x, t, y))
    other = random_dit(TINY, seed=9)
    with pytest.raises(ArtifactError, match="calibrated for model"):
        open_denoiser(art["recipe"], model=other)


def test_a_checkpoint_opens_as_the_float_model(art):
    opened = open_denoiser(art["ckpt"])
    assert (opened.backend, opened.precision, opened.config) == ("torch", "fp32", TINY)
    x, t, y = DiTSpec(TINY).sample_inputs(2, seed=1)
    with torch.no_grad():
        assert torch.equal(opened.denoiser(x, t, y), art["model"](x, t, y))


@pytest.mark.parametrize(
    "key, options, message",
    [
        ("onnx", {"model": "builtin"}, "--model does not apply to"),
        ("onnx", {"config_name": "DiT-S/2"}, "--config does not apply to"),
        ("ckpt", {"onnx": "m.onnx"}, "--onnx does not apply to"),
        ("recipe", {"config_name": "DiT-S/2"}, "a recipe records its model config"),
        ("ckpt", {"model": "builtin"}, "is a checkpoint"),
    ],
)
def test_an_option_the_backend_would_ignore_is_refused(art, key, options, message):
    with pytest.raises(ConfigError, match=message):
        open_denoiser(art[key], **options)


def test_a_graph_without_its_model_config_says_to_re_export(art, tmp_path):
    m = onnx.load(str(art["onnx"]))
    kept = [p for p in m.metadata_props if p.key != "ditrt.model_config"]
    del m.metadata_props[:]
    m.metadata_props.extend(kept)
    onnx.save(m, str(tmp_path / "old.onnx"))
    with pytest.raises(ArtifactError, match=r"does not record its model config .* re-export it with `ditrt export`"):
        open_denoiser(tmp_path / "old.onnx")


def test_engine_config_comes_from_the_sidecar_and_is_required(art):
    from ditrt.contracts.sidecar import make_sidecar
    from ditrt.runtime.tensorrt_backend import engine_config

    kw = dict(tensorrt_version="10.13", gpu_name="g", compute_capability=(9, 0), onnx_path="m.onnx", onnx_sha256="a", engine_sha256="b",
              precision="w8a8", profile={}, build={})  # fmt: skip
    meta = {"ditrt.model_config": json.dumps(TINY.to_dict())}
    assert engine_config(make_sidecar(**kw, onnx_metadata=meta), "m.plan") == TINY
    with pytest.raises(ArtifactError, match="does not record its model config"):
        engine_config(make_sidecar(**kw), "m.plan")


def test_an_engine_without_tensorrt_names_the_install(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: tests/tensorrt covers engines")
    except Exception:
        pass
    (tmp_path / "m.plan").write_bytes(b"x")
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        open_denoiser(tmp_path / "m.plan")
    from ditrt.runtime.tensorrt_backend import open_tensorrt

    (tmp_path / "g.g0.onnx").touch()
    with pytest.raises(ArtifactError, match="lists ONNX graphs, not TensorRT engines"):
        open_tensorrt(write_manifest(tmp_path / "g.onnx", (), [tmp_path / "g.g0.onnx"], "onnx"))


def test_each_backend_says_where_it_computes_and_answers_on_the_inputs_device(art):
    """The device rule of ditrt.runtime.open: ``opened.device`` is where to sample, and the output comes
    back on the input's device. Shown here for a checkpoint opened on 'meta' (a real tiny DiT: nothing
    in its call reads a value or mixes in a host tensor) and a graph in ONNX Runtime on the CPU; the
    cross-device copies (CPU inputs to a GPU engine and back) need a GPU (tests/tensorrt)."""
    x, t, y = DiTSpec(TINY).sample_inputs(2, seed=1)
    on_meta = open_denoiser(art["ckpt"], device="meta")
    assert on_meta.device == "meta"
    out = on_meta.denoiser(x.to("meta"), t.to("meta"), y.to("meta"))
    assert out.device.type == "meta" and out.shape == (2, 8, 8, 8) and out.dtype == torch.float32
    graph = open_denoiser(art["onnx"])
    assert graph.device == "cpu" and graph.denoiser(x, t, y).device.type == "cpu"


def test_images_per_call_comes_from_the_profile_and_refuses_what_cannot_fit(art):
    opened = open_denoiser(art["onnx"])
    assert opened.images_per_call(guided=True) is None  # a dynamic batch
    opened.max_rows, opened.min_rows = 9, 1
    assert (opened.images_per_call(guided=True), opened.images_per_call(guided=False), opened.max_images) == (4, 9, 4)
    opened.max_rows = 1
    with pytest.raises(ConfigError, match="guidance needs 2 rows per image"):
        opened.images_per_call(guided=True)
