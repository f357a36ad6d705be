"""Exports hold each weight once: streamed protobuf writing, lazy reading for the checker, a traced
copy that shares or converts the weights, and Q/DQ insertion that frees the float weights it replaces."""

import gc
import weakref

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import numpy_helper

from ditrt.contracts.errors import ArtifactError
from ditrt.contracts.recipe import folded_state
from ditrt.export import check_onnx, onnx_export, qdq
from ditrt.export.onnx_file import INLINE_BYTES, load_lazily, read_span, save_protobuf


@pytest.mark.parametrize("precision, dtype", [("float", "fp32"), ("w8a8", "fp16"), ("w4a16", "fp16")])
def test_streamed_file_is_the_bytes_onnx_ir_writes(exported, tmp_path, precision, dtype):
    model = ir.load(str(exported("tiny", precision, dtype)))
    ir.save(model, tmp_path / "whole.onnx", format="protobuf")
    save_protobuf(model, tmp_path / "streamed.onnx")
    assert (tmp_path / "streamed.onnx").read_bytes() == (tmp_path / "whole.onnx").read_bytes()
    assert all(v.const_value is not None for v in model.graph.initializers.values())  # the model is left as it was


def test_lazy_load_leaves_large_tensors_in_the_file(exported):
    path = exported("tiny", "w8a8", "fp16")
    full = onnx.load(str(path))
    lazy, spans = load_lazily(path)
    big = {t.name for t in full.graph.initializer if len(t.raw_data) > INLINE_BYTES}
    assert big and set(spans) == big
    for a, b in zip(lazy.graph.initializer, full.graph.initializer, strict=True):
        if a.name in big:  # a reference to its own bytes in the graph file, which are the tensor's
            assert a.data_location == onnx.TensorProto.EXTERNAL and not a.raw_data
            assert {e.key: e.value for e in a.external_data}["location"] == path.name
            assert read_span(path, spans[a.name]) == b.raw_data and list(a.dims) == list(b.dims)
        else:
            assert a == b
    del lazy.graph.initializer[:], full.graph.initializer[:]
    assert lazy == full  # nodes, inputs, outputs, metadata: all of it


def test_check_reads_a_weight_left_in_the_file_and_refuses_a_truncated_one(exported, tmp_path):
    m = onnx.load(str(exported("tiny", "float", "fp16")))
    t = next(t for t in m.graph.initializer if len(t.raw_data) > INLINE_BYTES and t.data_type == onnx.TensorProto.FLOAT16)
    a = numpy_helper.to_array(t).copy()
    a.flat[-1] = np.inf
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(m, str(tmp_path / "inf.onnx"))
    found = check_onnx(tmp_path / "inf.onnx")
    assert [v.rule for v in found] == ["finite"] and found[0].message.startswith(f"{t.name} (FLOAT16 "), found
    assert [p.name for p in tmp_path.iterdir()] == ["inf.onnx"]  # the checker's temp file is gone
    data = (tmp_path / "inf.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        check_onnx(tmp_path / "cut.onnx")


def test_traced_copy_shares_float32_weights_and_converts_float16_ones(models, recipes):
    m = models["tiny"]
    own = m.state_dict()
    fp32 = onnx_export.export_copy(m).state_dict()
    assert all(fp32[k].data_ptr() == v.data_ptr() for k, v in own.items())  # no copy of the weights
    folded = folded_state(recipes("tiny", "w8a8")[1])
    traced = onnx_export.export_copy(m, state=folded).state_dict()
    assert all(traced[k].data_ptr() == v.data_ptr() for k, v in folded.items())  # the recipe's weights, not copied
    fp16 = onnx_export.export_copy(m, "fp16", state=folded).state_dict()
    assert all(torch.equal(fp16[k], v.half()) for k, v in folded.items())  # what load_state_dict into .half() gives
    assert m.blocks[0].attn.qkv.weight.dtype == torch.float32 and m.blocks[0].attn.qkv.weight.requires_grad
    with pytest.raises(ArtifactError, match="missing pos_embed"):
        onnx_export.export_copy(m, state={k: v for k, v in folded.items() if k != "pos_embed"})


def test_qdq_insertion_frees_the_float_weights_it_replaces(models, recipes):
    """The float16 Linear weights of a W8A8 graph go as their integers come in: the traced copy's
    Parameters and the graph's (transposed) float initializers alike. onnx_ir keeps removed graph
    inputs alive otherwise (see onnx_export._forget_removed_inputs)."""
    m = models["tiny"]
    recipe, tensors = recipes("tiny", "w8a8")
    traced = onnx_export.export_copy(m, "fp16", state=folded_state(tensors))
    params = [weakref.ref(traced.get_submodule(name).weight) for name in recipe.layers]
    graph = onnx_export._export_float(traced, onnx_export.DEFAULT_OPSET, 2)
    del traced
    nodes = qdq.linear_nodes(graph.graph)
    floats = [weakref.ref(qdq.weight_initializer(nodes[name])[0].const_value) for name in recipe.layers]
    qdq.insert_qdq(graph, recipe, qdq.layer_weights(m, recipe, tensors), tensors, dtype="fp16")
    gc.collect()
    assert [r for r in params + floats if r() is not None] == []
    assert len(graph.graph.initializers) > len(recipe.layers)  # the graph itself is alive


def test_check_of_a_link_or_in_a_read_only_folder_checks_the_whole_file(exported, tmp_path):
    path = exported("tiny", "w8a8", "fp16")
    (tmp_path / "link.onnx").symlink_to(path)
    assert check_onnx(tmp_path / "link.onnx") == []
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "g.onnx").write_bytes(path.read_bytes())
    ro.chmod(0o555)
    try:
        assert check_onnx(ro / "g.onnx") == [] and [p.name for p in ro.iterdir()] == ["g.onnx"]
    finally:
        ro.chmod(0o755)
