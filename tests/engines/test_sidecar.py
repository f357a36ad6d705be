import hashlib
import json

import numpy as np
import onnx
import pytest

from ditrt.contracts.errors import ArtifactError
from ditrt.contracts.files import file_sha256, onnx_sha256
from ditrt.contracts.profile import BuildConfig, profile_shapes, profile_to_dict
from ditrt.contracts.sidecar import EngineSidecar, load_sidecar, make_sidecar, save_sidecar, sidecar_path, verify_sidecar
from ditrt.engines.onnx_info import read_onnx
from tests.engines.conftest import write_tiny_onnx

TRT, GPU, CC = "10.13.0.35", "NVIDIA H100 80GB HBM3", (9, 0)


@pytest.fixture
def built(tmp_path, tiny_onnx):
    """A fake *engine file* (bytes; nothing here claims to be TensorRT) plus the sidecar ditrt would write."""
    engine = tmp_path / "tiny.plan"
    engine.write_bytes(b"not a real engine: the sidecar checks only hash it")
    summary = read_onnx(tiny_onnx)
    config = BuildConfig(batch_min=1, batch_opt=2, batch_max=4)
    sidecar = make_sidecar(
        tensorrt_version=TRT, gpu_name=GPU, compute_capability=CC, onnx_path=tiny_onnx, onnx_sha256=onnx_sha256(tiny_onnx),
        engine_sha256=file_sha256(engine), precision=summary.precision, precision_source=summary.precision_source,
        profile=profile_to_dict(profile_shapes(summary.inputs, config)), build=config.to_dict(), onnx_metadata=summary.metadata,
    )  # fmt: skip
    save_sidecar(sidecar, engine)
    return engine, tiny_onnx, sidecar


def _verify(sidecar, **overrides):
    kw = {"trt_version": TRT, "gpu_name": GPU, "compute_capability": CC}
    kw.update(overrides)
    verify_sidecar(sidecar, **kw)


def _one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_round_trip(built):
    engine, onnx_path, sidecar = built
    assert sidecar_path(engine).name == "tiny.plan.json"
    loaded = load_sidecar(engine)
    assert loaded == sidecar
    assert loaded.compute_capability == (9, 0)
    assert loaded.max_batch == 8  # 4 images per call, doubled for guidance
    assert loaded.precision == "fp32" and loaded.precision_source == "inferred"
    assert loaded.build["batch_max"] == 4 and loaded.profile["x"]["max"] == [8, 4, 8, 8]
    raw = json.loads(sidecar_path(engine).read_text())
    assert raw["tensorrt_version"] == TRT and raw["gpu_name"] == GPU and raw["ditrt_version"]
    assert raw["onnx_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()


def test_matching_sidecar_passes(built):
    engine, onnx_path, _ = built
    _verify(load_sidecar(engine), onnx_path=onnx_path, engine_path=engine)
    _verify(load_sidecar(engine), compute_capability=[9, 0])  # lists (JSON) and tuples alike


def test_other_tensorrt_version_is_refused(built):
    engine, _, sidecar = built
    with pytest.raises(ArtifactError) as e:
        _verify(sidecar, trt_version="11.0.0.1", engine_path=engine)
    msg = _one_line(e)
    assert "built by TensorRT 10.13.0.35, this is TensorRT 11.0.0.1" in msg and "`ditrt build --onnx" in msg


@pytest.mark.parametrize("gpu, cc, expected", [
    ("NVIDIA GeForce RTX 4090", (8, 9), "this GPU is NVIDIA GeForce RTX 4090 (sm_89)"),
    ("NVIDIA H100 PCIe", (9, 0), "this GPU is NVIDIA H100 PCIe (sm_90)"),  # same architecture, other model
])  # fmt: skip
def test_other_gpu_is_refused(built, gpu, cc, expected):
    _, _, sidecar = built
    with pytest.raises(ArtifactError) as e:
        _verify(sidecar, gpu_name=gpu, compute_capability=cc)
    msg = _one_line(e)
    assert "built for NVIDIA H100 80GB HBM3 (sm_90)" in msg and expected in msg and "ditrt build" in msg


def test_changed_onnx_is_refused(built):
    engine, onnx_path, sidecar = built
    write_tiny_onnx(onnx_path, metadata={"ditrt.note": "re-exported"})
    with pytest.raises(ArtifactError) as e:
        _verify(sidecar, onnx_path=onnx_path, engine_path=engine)
    msg = _one_line(e)
    assert f"the ONNX {onnx_path} changed since engine {engine} was built" in msg and "sha256" in msg and "ditrt build" in msg


def test_missing_onnx_is_refused(built, tmp_path):
    _, _, sidecar = built
    with pytest.raises(ArtifactError, match="not found"):
        _verify(sidecar, onnx_path=tmp_path / "gone.onnx")


def test_replaced_engine_is_refused(built):
    engine, _, sidecar = built
    engine.write_bytes(b"some other engine")
    with pytest.raises(ArtifactError, match="does not match its sidecar"):
        _verify(sidecar, engine_path=engine)
    engine.unlink()
    with pytest.raises(ArtifactError, match="not found"):
        _verify(sidecar, engine_path=engine)


def test_the_engine_is_read_once_and_its_bytes_are_the_checked_ones(built):
    """read_engine returns the very bytes it hashed (what the runtime deserializes); replaced bytes are refused."""
    from ditrt.contracts.sidecar import check_engine_hash, read_engine

    engine, _, sidecar = built
    data = read_engine(sidecar, engine)
    assert data == engine.read_bytes() and hashlib.sha256(data).hexdigest() == sidecar.engine_sha256
    check_engine_hash(sidecar, engine, data)
    with pytest.raises(ArtifactError) as e:
        check_engine_hash(sidecar, engine, data + b"!")
    assert "does not match its sidecar" in _one_line(e) and "ditrt build --onnx" in str(e.value)
    engine.unlink()
    with pytest.raises(ArtifactError) as e:
        read_engine(sidecar, engine)
    assert "cannot read engine" in _one_line(e) and "ditrt build --onnx" in str(e.value)


def test_profile_rows_read_back(built):
    _, _, sidecar = built
    assert (sidecar.min_batch, sidecar.max_batch) == (1, 8)  # BuildConfig 1:2:4 images, guidance doubles opt and max


def test_missing_sidecar_is_refused(built):
    engine, _, _ = built
    sidecar_path(engine).unlink()
    with pytest.raises(ArtifactError) as e:
        load_sidecar(engine)
    assert "has no sidecar tiny.plan.json" in _one_line(e)


@pytest.mark.parametrize("text, message", [
    ('{"format": "ditrt-engine", ', "is corrupt"),
    ("\x00\x01binary", "is corrupt"),
    ('["a list"]', "not a ditrt engine sidecar"),
    ('{"format": "something-else"}', "not a ditrt engine sidecar"),
    ('{"format": "ditrt-engine", "format_version": 1, "tensorrt_version": "10.13"}', "lacks build, compute_capability"),
])  # fmt: skip
def test_corrupt_sidecar_is_refused(built, text, message):
    engine, _, _ = built
    sidecar_path(engine).write_text(text)
    with pytest.raises(ArtifactError) as e:
        load_sidecar(engine)
    msg = _one_line(e)
    assert message in msg and "ditrt build" in msg


def test_malformed_or_newer_sidecar_is_refused(built):
    engine, _, sidecar = built
    d = sidecar.to_dict()
    sidecar_path(engine).write_text(json.dumps({**d, "profile": {"x": {"min": [1]}}}))
    with pytest.raises(ArtifactError, match="malformed"):
        load_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps({**d, "format_version": 99}))
    with pytest.raises(ArtifactError, match="newer ditrt"):
        load_sidecar(engine)
    assert EngineSidecar.from_dict({**d, "unknown_future_key": 1}) == sidecar  # unknown keys are ignored


def test_save_is_atomic_and_leaves_no_temp_files(built, tmp_path):
    engine, _, sidecar = built
    save_sidecar(sidecar, engine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "tiny.plan", "tiny.plan.json"]


# ------------------------------------------------------------------ precision and hashes of the ONNX
def _with_activation_qdq(path):
    """The graph at ``path`` with an INT8 Q -> DQ (zero point 0) on ``x`` in front of its Mul."""
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    m.graph.initializer.extend([numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.int8(0), "xzp")])
    mul = next(n for n in m.graph.node if n.op_type == "Mul")
    qdq = [helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "xs", "xzp"], ["xdq"])]
    mul.input[0] = "xdq"
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(qdq + nodes)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize(
    "weight_dtype, activations, expected",
    [("fp32", False, "fp32"), ("fp16", False, "fp16"), ("int8", True, "w8a8"), ("int4", False, "w4a16"), ("int4", True, "w4a8"),
     ("int8", False, "w8a16")],  # weight-only INT8 is no registered precision: named by its formats, not called w8a8
)  # fmt: skip
def test_precision_inferred_from_the_graph_is_the_registry_name_of_its_formats(tmp_path, weight_dtype, activations, expected):
    from ditrt.contracts.precisions import PRECISIONS

    path = write_tiny_onnx(tmp_path / "m.onnx", weight_dtype=weight_dtype)
    s = read_onnx(_with_activation_qdq(path) if activations else path)
    assert (s.precision, s.precision_source) == (expected, "inferred")
    if weight_dtype in ("int8", "int4") and expected != "w8a16":
        assert expected in PRECISIONS
    assert s.dtype == ("fp16" if weight_dtype == "fp16" else "fp32")  # inferred too: no ditrt.dtype recorded


def test_dtype_from_metadata_wins(tmp_path):
    s = read_onnx(write_tiny_onnx(tmp_path / "m.onnx", weight_dtype="int4", metadata={"ditrt.dtype": "fp16"}))
    assert (s.precision, s.dtype) == ("w4a16", "fp16")


def test_precision_from_metadata_wins(tmp_path):
    path = write_tiny_onnx(tmp_path / "m.onnx", weight_dtype="int8", metadata={"ditrt.precision": "w8a8-ptq4dit", "other": "x"})
    s = read_onnx(path)
    assert (s.precision, s.precision_source) == ("w8a8-ptq4dit", "metadata")
    assert s.metadata == {"ditrt.precision": "w8a8-ptq4dit"}  # only ditrt.* keys are kept


def test_unreadable_onnx(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        read_onnx(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xfe garbage \x00" * 10)
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        read_onnx(bad)


def test_onnx_hash_covers_external_data(tmp_path):
    path = write_tiny_onnx(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.full((1,), 0.75, np.float32), "w"))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    assert read_onnx(path).external_data == ("m.data",)
    before = onnx_sha256(path)
    assert before != file_sha256(path)
    data = tmp_path / "m.data"
    data.write_bytes(data.read_bytes()[:-1] + b"\x01")
    assert onnx_sha256(path) != before
    data.unlink()
    with pytest.raises(ArtifactError, match="external data file"):
        onnx_sha256(path)


# ------------------------------------------------------------------ what TensorRT can build: the precision registry decides
def test_buildability_is_read_from_the_precision_registry(tmp_path, monkeypatch):
    import dataclasses

    from ditrt.contracts import precisions
    from ditrt.contracts.errors import ConfigError
    from ditrt.engines.build import check_buildable

    for float_graph in ("fp32", "fp16"):  # no registry entry: always buildable
        check_buildable("m.onnx", float_graph, float_graph)
    check_buildable("m.onnx", "w8a8", "fp32")
    check_buildable("m.onnx", "w4a16", "fp16")
    with pytest.raises(ConfigError, match="m.onnx is w4a8: INT4 weights with INT8 activations is no TensorRT format"):
        check_buildable("m.onnx", "w4a8", "fp32")
    with pytest.raises(ConfigError, match="w4a16 with fp32 activations.*`ditrt export --dtype fp16`"):
        check_buildable("m.onnx", "w4a16", "fp32")
    entry = dataclasses.replace(precisions.PRECISIONS["w8a8"], export_dtypes=("fp16",))
    monkeypatch.setitem(precisions.PRECISIONS, "w8a8", entry)
    with pytest.raises(ConfigError, match="w8a8 with fp32 activations"):
        check_buildable("m.onnx", "w8a8", "fp32")


def test_a_foreign_w4a16_graph_without_dtype_metadata_is_refused_before_tensorrt(tmp_path):
    """No ditrt.dtype: the float type is read from the graph (float32 scales), and float32 INT4 does not build."""
    from ditrt.contracts.errors import ConfigError
    from ditrt.engines.build import engine_from_onnx

    graph = write_tiny_onnx(tmp_path / "q.onnx", weight_dtype="int4")
    with pytest.raises(ConfigError, match="w4a16 with fp32 activations"):
        engine_from_onnx(graph, tmp_path / "q.plan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
