"""Real TensorRT engines of a small random DiT (the built-in model's architecture), fp16, w8a8,
w4a16 and fp8 (on GPUs of compute capability 8.9+ only), built through ``ditrt.engines`` and run by ``TensorRTDenoiser``, compared with ONNX Runtime
running the very same ONNX graph on real sampler inputs.

These need TensorRT 10.12+ and an NVIDIA GPU; where either is absent (this project's machines and
CI) the whole module is skipped with the reason. Nothing here is mocked.

Thresholds (relative L2 error of one forward, TensorRT vs ONNX Runtime, same graph): quantization
error cancels because both sides run the same Q/DQ graph; only execution differences remain.
- float32 graph (w8a8): TensorRT runs float32 (Polygraphy's CreateConfig disables TF32) and int8
  GEMMs like ORT's MatMulIntegerToFloat; what differs is float32 summation order and the rare
  activation that lands on the other side of an int8 rounding boundary: 1e-3, the bound of the
  ONNX parity tests.
- float16 graphs (fp16, w8a8 at fp16, w4a16, whose INT4 weight-only GEMMs need float16
  activations in TensorRT): both sides round activations to float16 (unit roundoff 2^-11, about
  4.9e-4) but at different points: TensorRT fuses GEMM + bias + GELU and attention into float16
  kernels (some with float16 accumulation) where ORT's CPU kernels compute in float32 and round
  once per op. About 20 roundoffs across 6 blocks: 1e-2, and that is all float16 is allowed.
"""

import copy
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from ditrt.contracts.errors import ArtifactError, InputError
from ditrt.contracts.profile import BuildConfig
from ditrt.contracts.sidecar import load_sidecar, sidecar_path
from ditrt.engines import engine_from_onnx, tensorrt_available
from tests.conftest import random_dit

AVAILABLE, WHY = tensorrt_available()
pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(not AVAILABLE, reason=f"TensorRT tests need TensorRT 10.12+ and a CUDA GPU: {WHY}"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: TensorRT tests need an NVIDIA GPU"),
]

#: name -> (export dtype, recipe precision or None, rel-L2 bound vs ONNX Runtime; see the module docstring)
CASES = {
    "fp16": ("fp16", None, 1e-2),
    "w8a8": ("fp32", "w8a8", 1e-3),
    "w8a8-fp16": ("fp16", "w8a8", 1e-2),
    "w4a16": ("fp16", "w4a16", 1e-2),
}
BATCH = BuildConfig(batch_min=1, batch_opt=4, batch_max=8)  # engine rows 1..16


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two sample sets in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a - b).double() ** 2).mean())
    return 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-20))).item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def model():
    from ditrt.contracts.model_config import CONFIGS

    return random_dit(CONFIGS["ditrt-digits"], std=0.03)


@pytest.fixture(scope="module")
def settings():
    from ditrt.contracts.recipe import CalibrationSettings

    return CalibrationSettings(steps="20", timesteps=5, samples=4)


@pytest.fixture(scope="module")
def batches(model, settings):
    from ditrt.diffusion.recording import record_calibration_inputs

    return record_calibration_inputs(model, settings)


@pytest.fixture(scope="module")
def inputs(batches):
    """16 real sampler inputs (two recorded steps, each 4 images + their null-class twins)."""
    parts = [batches[0], batches[2]]
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))


@pytest.fixture(scope="module")
def onnx_files(model, batches, settings, tmp_path_factory):
    from ditrt.calibrate.ptq import CalibrateConfig, calibrate
    from ditrt.export import export_onnx

    folder = tmp_path_factory.mktemp("onnx")
    files = {}
    for name, (dtype, precision, _) in CASES.items():
        recipe = tensors = None
        m = copy.deepcopy(model)  # neither calibration nor a float16 export may change the shared model
        if precision is not None:
            recipe, tensors = calibrate(m, CalibrateConfig(method="ptq4dit", precision=precision, calibration=settings), batches)
        files[name] = export_onnx(m, folder / f"{name}.onnx", dtype=dtype, recipe=recipe, tensors=tensors)
    return files


@pytest.fixture(scope="module")
def engines(onnx_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("engines")
    return {name: engine_from_onnx(path, folder / f"{name}.plan", BATCH) for name, path in onnx_files.items()}


def _ort(onnx_path, x, t, y):
    from ditrt.runtime.onnxruntime_backend import OnnxRuntimeDenoiser

    return torch.as_tensor(OnnxRuntimeDenoiser(onnx_path)(x, t, y)).float().cpu()


@pytest.mark.parametrize("name", list(CASES))
def test_engine_matches_onnxruntime_on_the_same_graph(name, engines, onnx_files, inputs):
    import tensorrt as trt

    from ditrt.runtime.tensorrt_backend import TensorRTDenoiser

    bound = CASES[name][2]
    sidecar = load_sidecar(engines[name])
    assert sidecar.tensorrt_version == trt.__version__ and sidecar.max_batch == 16
    assert sidecar.gpu_name == torch.cuda.get_device_name()
    x, t, y = inputs
    ref = _ort(onnx_files[name], x, t, y)
    trt_denoiser = TensorRTDenoiser(engines[name], device="cuda", onnx_path=onnx_files[name])
    assert trt_denoiser.max_batch == 16 and trt_denoiser.min_batch == 1
    # full batch, an odd batch (new input shapes), then the full batch again
    for rows in (16, 3, 16):
        out = trt_denoiser(x[:rows].cuda(), t[:rows].cuda(), y[:rows].cuda())
        assert out.shape == ref[:rows].shape and out.dtype == torch.float32 and out.is_cuda
        err = rel_l2(out, ref[:rows])
        assert err <= bound, f"{name}: rel L2 {err:.2e} > {bound:.0e} at batch {rows}"


#: FP8 tensor cores exist from compute capability 8.9 (Ada, Hopper); older GPUs refuse the graph (tests/engines).
FP8_GPU = torch.cuda.is_available() and tuple(torch.cuda.get_device_capability()) >= (8, 9)


@pytest.mark.skipif(not FP8_GPU, reason="FP8 engines need a GPU of compute capability 8.9 or newer (Ada, Hopper)")
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_fp8_engine_matches_onnxruntime_on_the_same_graph(dtype, model, batches, settings, inputs, tmp_path):
    """An fp8 (E4M3) graph built by TensorRT against ONNX Runtime on the CPU running the same graph. Bound
    1e-2 for both dtypes: an FP8 activation that lands on the other side of a rounding boundary moves by
    up to 1/16 of itself (3 mantissa bits, not INT8's 1/127 of the range), and Hopper's FP8 GEMMs do not
    accumulate in full float32, so the float32 graph gets the float16 cases' bound, not w8a8's 1e-3."""
    from ditrt.calibrate.ptq import CalibrateConfig, calibrate
    from ditrt.export import export_onnx
    from ditrt.runtime.tensorrt_backend import TensorRTDenoiser

    m = copy.deepcopy(model)
    recipe, tensors = calibrate(m, CalibrateConfig(method="ptq4dit", precision="fp8", calibration=settings), batches)
    onnx_path = export_onnx(m, tmp_path / f"fp8-{dtype}.onnx", dtype=dtype, recipe=recipe, tensors=tensors)
    engine = engine_from_onnx(onnx_path, tmp_path / f"fp8-{dtype}.plan", BATCH)
    assert load_sidecar(engine).precision == "fp8"
    x, t, y = inputs
    ref = _ort(onnx_path, x, t, y)
    out = TensorRTDenoiser(engine, device="cuda", onnx_path=onnx_path)(x.cuda(), t.cuda(), y.cuda())
    err = rel_l2(out, ref)
    assert err <= 1e-2, f"fp8 {dtype}: rel L2 {err:.2e} > 1e-2"


def test_cuda_graph_replays_match_eager(engines, inputs):
    from ditrt.runtime.tensorrt_backend import TensorRTDenoiser

    x, t, y = (v.cuda() for v in inputs)
    eager = TensorRTDenoiser(engines["w8a8"])
    graphed = TensorRTDenoiser(engines["w8a8"], use_cuda_graph=True)
    for rows in (16, 5, 16, 5):  # the second round replays the captured graphs
        a = eager(x[:rows], t[:rows], y[:rows]).clone()
        b = graphed(x[:rows], t[:rows], y[:rows]).clone()
        assert rel_l2(b, a) <= 1e-5  # same engine and tactics: only the launch path differs
    assert sorted(graphed._graphs) == [5, 16]


class _SyncsWhileCapturing:
    """Mixin for a real TensorRTDenoiser whose launch also synchronises the device: illegal while a CUDA
    graph is being captured (CUDA invalidates the capture), as an engine layer that cannot be captured is."""

    def _enqueue(self, context):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()
        super()._enqueue(context)


def test_a_refused_capture_falls_back_to_eager_launches_with_one_warning(engines, inputs, caplog):
    from ditrt.runtime.tensorrt_backend import TensorRTDenoiser

    class Refused(_SyncsWhileCapturing, TensorRTDenoiser):
        pass

    x, t, y = (v.cuda() for v in inputs)
    eager = TensorRTDenoiser(engines["w8a8"])
    refused = Refused(engines["w8a8"], use_cuda_graph=True)
    with caplog.at_level("WARNING", logger="ditrt.runtime.tensorrt_backend"):
        for rows in (16, 5, 16):
            a = eager(x[:rows], t[:rows], y[:rows]).clone()
            b = refused(x[:rows], t[:rows], y[:rows]).clone()
            assert rel_l2(b, a) <= 1e-5
    warnings = [r for r in caplog.records if "CUDA graph capture failed" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert refused.use_cuda_graph is False and refused._graphs == {}
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # the caller's stream is restored
    torch.cuda.synchronize()  # no CUDA error is left behind


def test_the_engine_runs_on_its_own_stream_ordered_with_the_callers(engines, inputs):
    """A caller on a stream of its own writes the inputs and reads the output right around the call,
    with no synchronisation: the two-way stream ordering makes it the same as on the default stream."""
    from ditrt.runtime.tensorrt_backend import TensorRTDenoiser

    x, t, y = (v.cuda() for v in inputs)
    den = TensorRTDenoiser(engines["w8a8"], use_cuda_graph=True)
    assert den._stream.cuda_stream not in (0, torch.cuda.default_stream().cuda_stream)  # never the legacy default stream
    ref = den(x, t, y).clone()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for _ in range(3):
            xs = x * 1.0  # written on the caller's stream just before the call
            got = den(xs, t, y) * 1.0  # read on it just after
    torch.cuda.synchronize()
    assert rel_l2(got, ref) <= 1e-6


def test_inputs_on_the_cpu_come_back_on_the_cpu(engines, inputs):
    from ditrt.runtime.tensorrt_backend import TensorRTDenoiser

    den = TensorRTDenoiser(engines["w8a8"])
    x, t, y = inputs
    on_gpu = den(x.cuda(), t.cuda(), y.cuda()).clone()
    on_cpu = den(x, t, y)
    assert on_cpu.device.type == "cpu" and on_gpu.is_cuda and rel_l2(on_cpu, on_gpu) <= 1e-6


def test_output_is_a_reused_buffer(engines, inputs):
    from ditrt.runtime.tensorrt_backend import TensorRTDenoiser

    x, t, y = (v.cuda() for v in inputs)
    den = TensorRTDenoiser(engines["w8a8"])
    first = den(x[:8], t[:8], y[:8])
    kept = first.clone()
    second = den(x[8:], t[8:], y[8:])
    assert first.data_ptr() == second.data_ptr()  # documented: clone to keep
    assert not torch.equal(first, kept) and torch.equal(first, second)


def test_int32_or_int64_labels_are_both_accepted(engines, inputs):
    from ditrt.runtime.tensorrt_backend import TensorRTDenoiser

    x, t, y = (v.cuda() for v in inputs)
    den = TensorRTDenoiser(engines["w8a8"])
    a = den(x, t, y).clone()
    b = den(x, t, y.to(torch.int32))  # copied into the engine's label buffer, whatever its integer type
    assert rel_l2(b, a) <= 1e-6


def test_batch_outside_the_profile_is_refused(engines, inputs):
    from ditrt.runtime.tensorrt_backend import TensorRTDenoiser

    den = TensorRTDenoiser(engines["w8a8"])
    x, t, y = (v.cuda() for v in inputs)
    with pytest.raises(InputError, match="outside"):
        den(torch.cat([x, x[:1]]), torch.cat([t, t[:1]]), torch.cat([y, y[:1]]))
    with pytest.raises(InputError, match="x must be"):
        den(x[:, :, :4], t, y)


def test_sampling_loop_on_the_engine_matches_onnxruntime(engines, onnx_files, model):
    """The same DDPM loop (math in torch on the GPU) around TensorRT and ORT: paired PSNR >= 40 dB."""
    from ditrt.diffusion.sampler import SamplerConfig, sample
    from ditrt.runtime.onnxruntime_backend import OnnxRuntimeDenoiser
    from ditrt.runtime.tensorrt_backend import TensorRTDenoiser

    ort = OnnxRuntimeDenoiser(onnx_files["w8a8"])

    def ort_on_cuda(x, t, y):
        return torch.as_tensor(ort(x.cpu(), t.cpu(), y.cpu())).float().cuda()

    cfg = model.config
    kw = {"num_classes": cfg.num_classes, "image_shape": (cfg.in_channels, cfg.input_size, cfg.input_size), "device": "cuda"}
    config = SamplerConfig(steps="20", cfg_scale=1.5, clip_denoised=True)
    labels, seeds = [0, 1, 2, 3, 4, 5, 6, 7], list(range(8))
    a = sample(TensorRTDenoiser(engines["w8a8"], use_cuda_graph=True), config, labels, seeds, **kw)
    b = sample(ort_on_cuda, config, labels, seeds, **kw)
    psnr = psnr_db(a, b)
    assert psnr >= 40.0, f"paired PSNR {psnr:.1f} dB"


def test_the_pipeline_on_cuda_builds_for_its_calls_and_samples_on_the_gpu(model, tmp_path):
    """`ditrt pipeline --device cuda` with TensorRT: --num 2 (an engine batch below the default opt used to be
    refused), the 8-row comparison inputs run on the engine, and the report says where each model ran."""
    from ditrt.cli import main
    from ditrt.models.checkpoints import save_ditrt_checkpoint

    ckpt = tmp_path / "m.safetensors"
    save_ditrt_checkpoint(model, ckpt)
    out = tmp_path / "run"
    args = ["pipeline", "--model", str(ckpt), "--steps", "5", "--num", "2", "--calib-timesteps", "2", "--calib-samples", "2",
            "--calib-steps", "10", "--device", "cuda", "--json", "--out", str(out)]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["quantized"]["backend"] == "tensorrt" and report["compare"]["outputs"]["out"]["cosine"] > 0.99  # the 8-row inputs ran
    assert report["devices"]["float"] == "cuda" and report["devices"]["quantized"].startswith("cuda")
    sidecar = load_sidecar(out / "model.plan")
    assert sidecar.profile["x"]["opt"][0] == 4 and sidecar.max_batch >= 8  # 2 images x 2 rows; the comparison's 8 rows


def test_cli_build_writes_engine_sidecar_and_timing_cache(onnx_files, tmp_path):
    import ditrt.cli.build_cmd  # noqa: F401
    from ditrt.cli import main

    out, cache = tmp_path / "m.plan", tmp_path / "cache" / "timing.cache"
    args = [
        "build",
        "--onnx",
        str(onnx_files["w8a8"]),
        "--out",
        str(out),
        "--batch",
        "1:2:4",
        "--opt-level",
        "1",
        "--timing-cache",
        str(cache),
        "--device",
        "cuda:0",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and out.stat().st_size > 0 and cache.stat().st_size > 0
    sidecar = load_sidecar(out)
    assert sidecar.build["opt_level"] == 1 and sidecar.max_batch == 8 and sidecar.precision
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "m.plan", "m.plan.json"]
    again = CliRunner().invoke(main, args)  # the warm cache is read back
    assert again.exit_code == 0, again.output


def test_edited_sidecar_or_changed_onnx_is_refused_before_deserializing(engines, onnx_files, tmp_path):
    from ditrt.runtime.tensorrt_backend import TensorRTDenoiser

    engine = tmp_path / "copy.plan"
    shutil.copy(engines["w8a8"], engine)
    d = json.loads(sidecar_path(engines["w8a8"]).read_text())
    sidecar_path(engine).write_text(json.dumps({**d, "tensorrt_version": "9.0.0.0"}))
    with pytest.raises(ArtifactError, match="built by TensorRT 9.0.0.0"):
        TensorRTDenoiser(engine)
    sidecar_path(engine).write_text(json.dumps({**d, "compute_capability": [7, 0], "gpu_name": "Tesla V100"}))
    with pytest.raises(ArtifactError, match=r"built for Tesla V100 \(sm_70\)"):
        TensorRTDenoiser(engine)
    with pytest.raises(ArtifactError, match="changed since"):
        TensorRTDenoiser(engines["w8a8"], onnx_path=onnx_files["w4a16"])


def test_timestep_group_engines_sample_like_onnxruntime(model, batches, settings, tmp_path):
    """K = 2 activation-scale groups: `ditrt build` of the export's manifest writes one engine per
    group and an engine manifest; the DDPM loop switching engines by timestep matches the same loop
    switching ONNX Runtime graphs (paired PSNR >= 40 dB, the single-engine bound above)."""
    import ditrt.cli.build_cmd  # noqa: F401
    from ditrt.calibrate.ptq import CalibrateConfig, calibrate
    from ditrt.cli import main
    from ditrt.contracts.groups import read_manifest
    from ditrt.diffusion.sampler import SamplerConfig, sample
    from ditrt.export.onnx_export import export_timestep_groups
    from ditrt.runtime.groups import TimestepGroupDenoiser
    from ditrt.runtime.onnxruntime_backend import OnnxRuntimeDenoiser
    from ditrt.runtime.tensorrt_backend import TensorRTDenoiser

    m = copy.deepcopy(model)
    config = CalibrateConfig(method="minmax", precision="w8a8", timestep_groups=2, calibration=settings)
    recipe, tensors = calibrate(m, config, batches)
    onnx_manifest = export_timestep_groups(m, tmp_path / "m.onnx", recipe=recipe, tensors=tensors)
    result = CliRunner().invoke(main, ["build", "--onnx", str(onnx_manifest), "--out", str(tmp_path / "e" / "m.plan"), "--batch", "1:4:8"])
    assert result.exit_code == 0, result.output
    edges, engines = read_manifest(tmp_path / "e" / "m.groups.json", "tensorrt")
    assert edges == recipe.timestep_group_edges and [e.name for e in engines] == ["m.g0.plan", "m.g1.plan"]
    assert [load_sidecar(e).onnx_metadata["ditrt.timestep_group"] for e in engines] == ["0", "1"]

    trt = TimestepGroupDenoiser.from_manifest(tmp_path / "e" / "m.groups.json", TensorRTDenoiser, kind="tensorrt")
    ort = TimestepGroupDenoiser.from_manifest(onnx_manifest, OnnxRuntimeDenoiser)

    def ort_on_cuda(x, t, y):
        return torch.as_tensor(ort(x.cpu(), t.cpu(), y.cpu())).float().cuda()

    cfg = model.config
    kw = {"num_classes": cfg.num_classes, "image_shape": (cfg.in_channels, cfg.input_size, cfg.input_size), "device": "cuda"}
    sampler = SamplerConfig(steps="20", cfg_scale=1.5, clip_denoised=True)
    labels, seeds = [0, 1, 2, 3], list(range(4))
    a = sample(trt, sampler, labels, seeds, **kw)
    b = sample(ort_on_cuda, sampler, labels, seeds, **kw)
    psnr = psnr_db(a, b)
    assert psnr >= 40.0, f"paired PSNR {psnr:.1f} dB"
