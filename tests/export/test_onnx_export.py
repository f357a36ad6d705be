"""Float graphs: I/O contract, parity with torch, float16 layout, metadata, external data, atomic writes."""

import json

import onnx
import pytest
import torch

from ditrt import __version__
from ditrt.contracts.errors import ConfigError
from ditrt.contracts.spec import DiTSpec
from ditrt.export import check_onnx, export_onnx, onnx_export
from tests.export.recipes import ort_session, rel_l2, run

#: float16 unit roundoff is 4.9e-4; the whole network in float16 (LayerNorm and the timestep
#: sinusoid in float32) measured 2.9e-4..3.7e-4 rel L2 against float32 torch on random TINY/digits DiTs.
FP16_TOL = 2e-3


@pytest.mark.parametrize("name", ["tiny", "digits"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_graph_passes_the_checkers(exported, name, dtype):
    assert check_onnx(exported(name, dtype=dtype)) == []


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_io_contract_has_float32_boundary_and_dynamic_batch(exported, dtype):
    m = onnx.load(str(exported("digits", dtype=dtype)))
    tensor = onnx.TensorProto
    io = {v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
          for v in [*m.graph.input, *m.graph.output]}  # fmt: skip
    assert io == {
        "x": (tensor.FLOAT, ["batch", 1, 8, 8]),
        "t": (tensor.FLOAT, ["batch"]),
        "y": (tensor.INT64, ["batch"]),
        "out": (tensor.FLOAT, ["batch", 2, 8, 8]),
    }
    assert {o.domain: o.version for o in m.opset_import}[""] == 21
    assert "Attention" not in {n.op_type for n in m.graph.node}


@pytest.mark.parametrize("name", ["tiny", "digits"])
@pytest.mark.parametrize("batch", [1, 5])
def test_float32_graph_matches_torch(models, exported, name, batch):
    model, session = models[name], ort_session(exported(name))
    x, t, y = DiTSpec(model.config).sample_inputs(batch, seed=batch)
    with torch.no_grad():
        ref = model(x, t, y)
    out = run(session, x, t, y)
    assert out.shape == ref.shape
    assert rel_l2(out, ref) <= 1e-3  # measured 2e-7..5e-7


@pytest.mark.parametrize("name", ["tiny", "digits"])
def test_float16_graph_matches_float32_torch_within_float16_error(models, exported, name):
    model, session = models[name], ort_session(exported(name, dtype="fp16"))
    for batch in (1, 5):
        x, t, y = DiTSpec(model.config).sample_inputs(batch, seed=7)
        with torch.no_grad():
            ref = model(x, t, y)
        assert rel_l2(run(session, x, t, y), ref) <= FP16_TOL


def test_float16_graph_runs_layernorm_in_float32(exported):
    m = onnx.shape_inference.infer_shapes(onnx.load(str(exported("digits", dtype="fp16"))))
    types = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.value_info, *m.graph.input, *m.graph.output]}
    types.update({t.name: t.data_type for t in m.graph.initializer})
    lns = [n for n in m.graph.node if n.op_type == "LayerNormalization"]
    assert len(lns) == 2 * 6 + 1
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT and types[n.output[0]] == onnx.TensorProto.FLOAT for n in lns)
    weights = [t for t in m.graph.initializer if t.name.endswith(".weight") or t.name.endswith(".bias")]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    matmuls = [n for n in m.graph.node if n.op_type == "MatMul"]
    assert all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in matmuls)


def test_linear_nodes_are_named_after_their_modules(exported):
    names = {n.name for n in onnx.load(str(exported("tiny"))).graph.node}
    assert {"blocks.0.attn.qkv/MatMul", "blocks.1.mlp.fc2/Add", "final_layer.linear/MatMul", "t_embedder.mlp.0/Gemm"} <= names


def test_metadata_records_version_config_and_precision(models, exported):
    meta = {p.key: p.value for p in onnx.load(str(exported("digits", dtype="fp16"))).metadata_props}
    assert meta["ditrt.version"] == __version__
    assert json.loads(meta["ditrt.model_config"]) == models["digits"].config.to_dict()
    assert meta["ditrt.dtype"] == meta["ditrt.precision"] == "fp16"
    assert len(meta["ditrt.model_hash"]) == 64
    assert not any(k.startswith("ditrt.recipe") for k in meta)


def test_export_is_reproducible_and_leaves_no_temp_files(models, exported, tmp_path):
    a = exported("tiny")  # exported once for the session, into another folder under another name
    b = export_onnx(models["tiny"], tmp_path / "sub" / "b.onnx")
    assert a.read_bytes() == b.read_bytes()  # no stack traces or local paths in the graph
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["b.onnx"]
    assert all(p.suffix == ".onnx" for p in a.parent.iterdir())


def test_failed_export_leaves_the_previous_file(models, exported, tmp_path, monkeypatch):
    before = exported("tiny").read_bytes()
    path = tmp_path / "m.onnx"
    path.write_bytes(before)  # a previous export there

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("onnx_ir.save", broken_save)
    with pytest.raises(OSError):
        export_onnx(models["tiny"], path, dtype="fp16")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_large_models_use_external_data(models, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 10_000)  # TINY's weights are ~0.8 MB
    path = export_onnx(models["tiny"], tmp_path / "big.onnx")
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and data.stat().st_size > 10 * path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    graph = onnx.load(str(path), load_external_data=False).graph
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    assert check_onnx(path) == []
    x, t, y = DiTSpec(models["tiny"].config).sample_inputs(2)
    with torch.no_grad():
        assert rel_l2(run(ort_session(path), x, t, y), models["tiny"](x, t, y)) <= 1e-3
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 10**12)
    export_onnx(models["tiny"], path)  # re-exported inline: the stale data file goes
    assert [p.name for p in tmp_path.iterdir()] == ["big.onnx"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": "bf16"}, "unknown export dtype"),
        ({"opset": 23}, "opset 23 is not supported"),
        ({"opset": 17}, "invalid graphs below 18"),
        ({"batch": 1}, "trace batch must be an integer >= 2"),
        ({"recipe": object()}, "pass both recipe and tensors"),
    ],
)
def test_bad_options_are_refused(models, tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        export_onnx(models["tiny"], tmp_path / "m.onnx", **kwargs)
    assert not list(tmp_path.iterdir())


def test_older_opset_graph_is_valid_and_exact(models, tmp_path):
    path = export_onnx(models["tiny"], tmp_path / "m.onnx", opset=18)
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == 18
    assert check_onnx(path) == []
    x, t, y = DiTSpec(models["tiny"].config).sample_inputs(3)
    with torch.no_grad():
        assert rel_l2(run(ort_session(path), x, t, y), models["tiny"](x, t, y)) <= 1e-3


def test_initializer_bytes_counts_the_weights(models, exported):
    import onnx_ir as ir

    n_params = sum(p.numel() for p in models["tiny"].parameters())
    assert onnx_export.initializer_bytes(ir.load(str(exported("tiny")))) == pytest.approx(4 * n_params, rel=0.05)
