"""The pipeline's like-for-like speed figure (the float and the quantized graph timed side by side on the
same backend) and its report of the layers a recipe left in float, on a tiny random DiT."""

import dataclasses
import re
import time

import pytest
import torch

from ditrt.compare.speed import speed_comparison, speed_line, time_side_by_side
from ditrt.contracts.errors import InputError
from ditrt.pipeline import recipe_markdown, recipe_report


@pytest.fixture(scope="module")
def fallback_run(tiny_artifacts, tmp_path_factory):
    """A minmax W8A8 recipe of the tiny model with its 2 most sensitive layers left in float (the real
    fallback), exported and opened with ONNX Runtime, and the pipeline's comparison inputs."""
    from ditrt.calibrate.config import CalibrateConfig
    from ditrt.calibrate.ptq import calibrate
    from ditrt.compare.inputs import record_feeds
    from ditrt.contracts.recipe import CalibrationSettings
    from ditrt.diffusion.recording import record_calibration_inputs
    from ditrt.export.onnx_export import export_model
    from ditrt.models.quantized import quantized_model
    from ditrt.runtime.open import open_denoiser

    torch.set_num_threads(1)
    model = tiny_artifacts["model"]
    settings = CalibrationSettings(steps="10", timesteps=2, samples=2)
    config = CalibrateConfig(method="minmax", precision="w8a8", calibration=settings, max_float_layers=2)
    recipe, tensors = calibrate(model, config, record_calibration_inputs(model, settings))
    graph = export_model(model, tmp_path_factory.mktemp("speed") / "model.onnx", recipe=recipe, tensors=tensors)
    simulated = quantized_model(model, recipe, tensors)
    feeds = record_feeds(model, steps="10", timesteps=3, samples=2)
    with open_denoiser(graph) as opened:
        yield {"recipe": recipe, "opened": opened, "feeds": feeds, "float_graph": tiny_artifacts["onnx"], "graph": graph,
               "simulated": simulated}  # fmt: skip


def test_speed_times_float_and_quantized_graphs_on_the_same_backend(fallback_run):
    opened, feeds = fallback_run["opened"], fallback_run["feeds"]
    speed = speed_comparison(fallback_run["float_graph"], opened, feeds, out_dir=fallback_run["float_graph"].parent)
    f, q = speed["float"], speed["quantized"]
    assert f["backend"] == q["backend"] == speed["backend"] == "onnxruntime" and f["device"] == q["device"] == speed["device"] == "cpu"
    assert (f["artifact"], q["artifact"]) == ("m.onnx", "model.onnx")  # the float graph vs the graph that runs
    assert speed["ms_per_call_float"] == f["ms_per_call"] > 0 and speed["ms_per_call_quantized"] == q["ms_per_call"] > 0
    assert speed["ratio"] == pytest.approx(f["ms_per_call"] / q["ms_per_call"], rel=1e-12)
    assert all(lo <= side["ms_per_call"] <= hi for side in (f, q) for lo, hi in [side["ms_range"]])
    assert speed["rows_per_call"] == len(feeds[0]["x"]) == 4 and speed["calls_per_pass"] == len(feeds)
    line = speed_line(speed)
    assert re.fullmatch(r"quantized vs float on onnxruntime: \d+\.\d\dx \(\d+\.\d\d ms vs \d+\.\d\d ms per call of 4 rows\)", line), line
    assert f"{q['ms_per_call']:.2f} ms vs {f['ms_per_call']:.2f} ms" in line


def test_side_by_side_timing_alternates_and_measures_each_call():
    """Two real callables with known costs (sleeps of 12 and 4 ms): the calls alternate, the first of
    the pair swapping every pass, after the warm-up, and the ratio is float / quantized."""
    calls = []

    def slow(x, t, y):
        calls.append("float")
        time.sleep(0.012)
        return x

    def fast(x, t, y):
        calls.append("quantized")
        time.sleep(0.004)
        return x

    feeds = [{"x": torch.zeros(2, 1).numpy(), "t": torch.zeros(2).numpy(), "y": torch.zeros(2, dtype=torch.long).numpy()}] * 2
    timed = time_side_by_side(slow, fast, feeds, warmup=1, repeats=3)
    assert calls[:4] == ["float", "quantized"] * 2  # warm-up: one pass
    assert calls[4:8] == ["float", "quantized"] * 2 and calls[8:12] == ["quantized", "float"] * 2 and len(calls) == 16
    assert timed["float"]["ms_per_call"] >= 12 and timed["quantized"]["ms_per_call"] >= 4 and timed["rows_per_call"] == 2
    # the ratio is float / quantized (its value is left to the benchmarks: a sleep overshoots by what the machine's load says)
    assert timed["ratio"] == pytest.approx(timed["float"]["ms_per_call"] / timed["quantized"]["ms_per_call"])
    with pytest.raises(InputError, match="one batch size"):
        time_side_by_side(slow, fast, [feeds[0], {**feeds[0], "x": torch.zeros(3, 1).numpy()}])


def test_the_report_lists_the_layers_left_in_float_with_their_sensitivity(fallback_run):
    recipe = fallback_run["recipe"]
    assert len(recipe.float_layers) == 2  # the real fallback chose them (max_float_layers=2)
    rec = recipe_report(recipe)
    assert rec["float_layers"] == recipe.float_layers and rec["layers"] == len(recipe.layers)
    assert rec["weight_rounding"] == "rtn" and rec["runtime_smoothed"] == 0
    fb = recipe.details["fallback"]
    assert rec["fallback"]["budget"] == {"min_psnr": None, "max_float_layers": 2} and rec["fallback"]["met"] is True
    assert rec["fallback"]["psnr_db"] == fb["psnr_db"] and "ranking" not in rec["fallback"]  # the ranking stays in recipe.json
    md = "\n".join(recipe_markdown(rec))
    for layer, r in recipe.float_layers.items():
        assert f"| `{layer}` | {r['sensitivity']:.3g} | {r['sqnr_gain_db']:.2f} | {r['rank']} |" in md
    assert "2 layer(s) left in float" in md and "at most 2 float layers: met" in md and f"{fb['psnr_db']:.2f} dB" in md

    # what the recipe section says of GPTQ rounding, run-time smoothing and a budget that was not met
    gptq = dataclasses.replace(recipe, weight_rounding="gptq", runtime_smoothed=recipe.layers[:1], float_layers={},
                               details={"fallback": {**fb, "budget": {"min_psnr": 60.0, "max_float_layers": None}, "met": False}})  # fmt: skip
    rec = recipe_report(gptq)
    md = "\n".join(recipe_markdown(rec))
    assert rec["weight_rounding"] == "gptq" and rec["runtime_smoothed"] == 1 and rec["float_layers"] == {}
    assert "weight rounding gptq" in md and "1 smoothed at run time" in md and "probe PSNR >= 60 dB: NOT met" in md
    assert "| layer left in float |" not in md


def test_a_recipe_with_float_layers_passes_the_check_and_runs_as_simulated(fallback_run):
    """The layers left in float export without Q/DQ: the graph holds Q/DQ for the quantized layers only,
    passes ``ditrt check``, and ONNX Runtime computes what the simulation computes (the W8A8 bound of
    tests/export/test_builtin_parity.py)."""
    import onnx

    from ditrt.export import check_onnx
    from ditrt.quality.metrics import relative_error

    recipe, graph = fallback_run["recipe"], fallback_run["graph"]
    assert len(recipe.float_layers) == 2 and check_onnx(graph) == []
    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    dq = [n for n in nodes if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 * len(recipe.layers)  # one for the weight, one for the input of each quantized layer
    run = fallback_run["opened"].denoiser
    with torch.no_grad():
        for f in fallback_run["feeds"]:
            x, t, y = (torch.from_numpy(f[k]) for k in ("x", "t", "y"))
            assert relative_error(fallback_run["simulated"](x, t, y), run(x, t, y)) <= 2e-2
