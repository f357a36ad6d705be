"""FP8 (E4M3) W8A8: the quantizer's grid, the precision's registry entry, the GPU it needs and the
calibration options it refuses."""

import pytest
import torch

from ditrt.calibrate.config import CalibrateConfig
from ditrt.contracts.errors import ConfigError
from ditrt.contracts.precisions import FP8_E4M3, get_precision
from ditrt.contracts.quantizers import fake_quant, fake_quant_weight, qrange, quantize


def e4m3_values() -> torch.Tensor:
    """Every finite E4M3 value (254 of the 256 codes: 0x7F and 0xFF are NaN), ascending, float32."""
    v = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return v[~v.isnan()].unique()


def test_every_e4m3_value_round_trips_exactly():
    v = e4m3_values()
    assert len(v) == 253 and float(v.max()) == 448.0 == FP8_E4M3.qmax  # +-0 are one value
    assert torch.equal(quantize(v, torch.tensor(1.0), None, FP8_E4M3), v)
    s = torch.tensor(0.0371)
    assert torch.equal(fake_quant(v * s, s, None, FP8_E4M3), v * s)
    assert torch.equal(quantize(v.half(), torch.tensor(1.0).half(), None, FP8_E4M3), v.half())  # float16 holds E4M3 exactly


def test_saturates_at_448_instead_of_overflowing_to_nan():
    x = torch.tensor([448.0, 463.9, 464.0, 500.0, 1e6, float("inf"), -500.0, -float("inf")])
    assert quantize(x, torch.tensor(1.0), None, FP8_E4M3).tolist() == [448.0] * 6 + [-448.0] * 2
    assert qrange(FP8_E4M3) == (-448.0, 448.0)


def test_midpoints_round_half_to_even():
    v = e4m3_values()
    pos = v[v >= 0]
    mid = (pos[:-1] + pos[1:]) / 2  # exact in float32
    q = quantize(torch.cat([mid, -mid]), torch.tensor(1.0), None, FP8_E4M3)
    codes = lambda t: t.to(torch.float8_e4m3fn).view(torch.uint8).int()  # noqa: E731
    even = torch.where(codes(pos[:-1]) % 2 == 0, pos[:-1], pos[1:])  # the neighbour with an even last mantissa bit
    assert torch.equal(q, torch.cat([even, -even]))
    assert quantize(torch.tensor([17.0, 19.0]), torch.tensor(1.0), None, FP8_E4M3).tolist() == [16.0, 20.0]


def test_per_tensor_weight_scale_and_no_zero_point():
    w = torch.randn(6, 8)
    s = w.abs().max() / 448
    out = fake_quant_weight(w, s, None, FP8_E4M3)
    assert out.shape == w.shape and float((out - w).abs().max()) <= float(w.abs().max()) / 16  # 3 mantissa bits
    with pytest.raises(ConfigError, match="zero points must be 0"):
        quantize(w, s, torch.ones(()), FP8_E4M3)
    with pytest.raises(ConfigError, match="no zero point"):
        qrange(FP8_E4M3, symmetric=False)


def test_fp8_precision_entry():
    p = get_precision("fp8")
    assert (p.weight_fmt, p.act_fmt, p.weight_granularity) == (FP8_E4M3, FP8_E4M3, "tensor")
    assert p.tensorrt and p.export_dtypes == ("fp32", "fp16") and p.parity == get_precision("w8a8").parity
    assert p.default_weights in ("rtn", "gptq")
    CalibrateConfig(precision="fp8", weights=p.default_weights)  # valid for it


@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (8, 6)])
def test_fp8_refused_on_gpus_without_fp8_tensor_cores(capability):
    with pytest.raises(ConfigError, match=r"compute capability 8\.9 or newer.*this GPU is \d\.\d"):
        get_precision("fp8").check_gpu(capability, "m.onnx")


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0), (12, 0)])
def test_fp8_accepted_on_ada_hopper_and_later(capability):
    get_precision("fp8").check_gpu(capability, "m.onnx")
    get_precision("w8a8").check_gpu((7, 5), "m.onnx")  # INT8 asks for no minimum


@pytest.mark.parametrize(("options", "message"), [
    ({"reconstruct": True}, "integer grids only.*drop --reconstruct at fp8"),
    ({"symmetric": False}, "no zero points.*drop --asymmetric"),
])  # fmt: skip
def test_fp8_refuses_what_has_no_float_grid_form(options, message):
    with pytest.raises(ConfigError, match=message):
        CalibrateConfig(method="minmax", precision="fp8", **options)
