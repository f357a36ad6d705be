"""What ONNX Runtime makes of ditrt's graphs at the built-in model's shape (issue 15): the kernels it
runs with ditrt's session settings, against what its defaults would run."""

from collections import Counter

import onnx
import pytest

from ditrt.contracts.model_config import CONFIGS
from ditrt.runtime.onnxruntime_backend import DISABLED_OPTIMIZERS, make_session

DEPTH = CONFIGS["ditrt-digits"].depth


def optimized_ops(path, tmp_path, **options) -> Counter:
    out = tmp_path / f"{path.stem}-{len(list(tmp_path.iterdir()))}.optimized.onnx"
    make_session(path, threads=1, optimized_model_path=out, **options)
    return Counter(n.op_type for n in onnx.load(str(out)).graph.node)


@pytest.mark.parametrize("precision", ["float", "w8a8"])
def test_layer_norms_run_as_plain_layer_normalization(exported, tmp_path, precision):
    """ONNX Runtime's SkipLayerNormFusion would fuse the last residual Add into the final LayerNorm,
    a kernel 6x slower than the two it replaces; ditrt's sessions keep every LayerNorm plain."""
    path = exported("digits", precision)
    ops = optimized_ops(path, tmp_path)
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 2 * DEPTH + 1
    without_the_switch = optimized_ops(path, tmp_path, disabled_optimizers=tuple(o for o in DISABLED_OPTIMIZERS if o != "SkipLayerNormFusion"))
    assert without_the_switch["SkipLayerNormalization"] == 1 and without_the_switch["LayerNormalization"] == 2 * DEPTH


def test_matmul_add_fusion_would_take_the_2d_linears_off_the_int8_kernel(exported, tmp_path):
    """Why the MatMulAddFusion switch stays with ONNX Runtime 1.32: it leaves the 3-D token Linears alone
    (dynamic batch) but turns the 2-D ones (adaLN and the timestep MLP, quantized here) into float Gemms.
    With the switch every Linear runs on the int8 kernel, its bias in a separate Add (the
    MatMulIntegerToFloat that Q/DQ fusion makes takes no bias)."""
    path = exported("digits", "w8a8")
    ditrt = optimized_ops(path, tmp_path)
    linears = 5 * DEPTH + 4  # the suite recipe quantizes every Linear: qkv, proj, fc1, fc2, adaLN per block and 4 more
    assert ditrt["MatMulIntegerToFloat"] == linears and ditrt["Gemm"] == 0 and ditrt["DequantizeLinear"] == 0
    fusion_on = optimized_ops(path, tmp_path, disabled_optimizers=tuple(o for o in DISABLED_OPTIMIZERS if o != "MatMulAddFusion"))
    two_d = DEPTH + 3  # adaLN of every block and of the final layer, the timestep MLP's two
    assert fusion_on["MatMulIntegerToFloat"] == linears - two_d and fusion_on["Gemm"] == two_d
