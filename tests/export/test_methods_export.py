"""Every calibration method (and reconstruction, and timestep groups) makes a recipe that exports,
passes `ditrt check`, and runs in ONNX Runtime within the export parity bounds of
test_builtin_parity.py (rel L2 per forward: 1e-3 for INT4-weight-only graphs, 2e-2 with INT8
activations, whose rounding flips cascade)."""

import pytest
import torch

from ditrt.calibrate.methods import QDiTSettings
from ditrt.calibrate.ptq import CalibrateConfig, calibrate, group_batches
from ditrt.contracts.errors import ConfigError, InputError
from ditrt.export import check_onnx, export_onnx
from ditrt.export.onnx_export import export_timestep_groups
from ditrt.models.quantized import quantized_model
from ditrt.quality.metrics import relative_error
from ditrt.runtime.groups import TimestepGroupDenoiser
from ditrt.runtime.onnxruntime_backend import OnnxRuntimeDenoiser
from tests.export.conftest import BUILTIN_SETTINGS as SETTINGS

BOUND = {"w8a8": 2e-2, "w4a16": 1e-3}
#: Reconstruction steps per block: what is checked here is that a reconstructed recipe (learned rounding and
#: input scales) exports and matches its simulation, not how well it learned (tests/calibrate/test_reconstruct.py).
RECON_ITERS = 5

CASES = {
    "ditas-w8a8": dict(method="ditas", precision="w8a8"),
    "ditas-w4a16": dict(method="ditas", precision="w4a16"),
    "qdit-w4a16": dict(method="qdit", precision="w4a16", method_settings=QDiTSettings(fitness="proxy", budget=70.0)),
    "ptq4dit-recon-w8a8": dict(method="ptq4dit", precision="w8a8", reconstruct=True, reconstruct_iters=RECON_ITERS),
    "minmax-recon-w4a16": dict(method="minmax", precision="w4a16", reconstruct=True, reconstruct_iters=RECON_ITERS),
}


@pytest.mark.parametrize("case", list(CASES))
def test_method_recipe_exports_checks_and_matches_the_simulation(builtin, batches, case, tmp_path):
    config = CalibrateConfig(calibration=SETTINGS, **CASES[case])
    recipe, tensors = calibrate(builtin, config, batches)
    assert recipe.deployable and recipe.reconstructed == config.reconstruct
    path = export_onnx(builtin, tmp_path / "m.onnx", recipe=recipe, tensors=tensors)
    assert check_onnx(path) == []
    sim, ort = quantized_model(builtin, recipe, tensors), OnnxRuntimeDenoiser(path, threads=1)
    with torch.no_grad():
        errors = [relative_error(sim(x, t, y), ort(x, t, y)) for x, t, y in batches]
    assert max(errors) <= BOUND[config.precision], errors
    if config.method == "qdit":  # the searched per-layer blocks are what the graph carries
        assert set(recipe.layer_block_sizes.values()) <= {64, 128}


def test_timestep_groups_export_one_graph_per_group_and_the_runtime_switches(builtin, batches, tmp_path):
    config = CalibrateConfig(method="minmax", precision="w8a8", timestep_groups=2, calibration=SETTINGS)
    recipe, tensors = calibrate(builtin, config, batches)
    groups, edges = group_batches(batches, 2)
    assert recipe.timestep_group_edges == edges and len(edges) == 1
    assert [len(g) for g in groups] == [4, 4] and all(recipe.group_of(float(b[1][0])) == i for i, g in enumerate(groups) for b in g)
    scales = tensors["quant.blocks.0.mlp.fc2.input_scale"]
    assert scales.shape == (2,) and scales[0] != scales[1]
    with pytest.raises(ConfigError, match="timestep groups"):
        export_onnx(builtin, tmp_path / "one.onnx", recipe=recipe, tensors=tensors)
    manifest = export_timestep_groups(builtin, tmp_path / "m.onnx", recipe=recipe, tensors=tensors)
    assert all(check_onnx(tmp_path / f"m.g{g}.onnx") == [] for g in range(2))
    ort = TimestepGroupDenoiser.from_manifest(manifest, lambda p: OnnxRuntimeDenoiser(p, threads=1))
    sim = quantized_model(builtin, recipe, tensors)
    with torch.no_grad():
        errors = [relative_error(sim(x, t, y), ort(x, t, y)) for x, t, y in batches]
        assert max(errors) <= BOUND["w8a8"], errors
        # the simulation really switches: group 1's graph differs from group 0's on a group-1 batch
        x, t, y = groups[1][0]
        assert relative_error(ort.denoisers[0](x, t, y), ort.denoisers[1](x, t, y)) > 1e-4
        with pytest.raises(InputError, match="mixes timesteps"):
            sim(torch.cat([groups[0][0][0], x]), torch.cat([groups[0][0][1], t]), torch.cat([groups[0][0][2], y]))


def test_dynamic_activations_simulate_but_do_not_export(builtin, batches, tmp_path):
    config = CalibrateConfig(method="minmax", precision="w4a8", dynamic_activations=True, calibration=SETTINGS)
    recipe, tensors = calibrate(builtin, config, batches)
    assert not recipe.deployable
    static = quantized_model(builtin, *calibrate(builtin, CalibrateConfig(method="minmax", precision="w4a8", calibration=SETTINGS), batches))
    dynamic = quantized_model(builtin, recipe, tensors)
    x, t, y = batches[-1]
    with torch.no_grad():
        ref = builtin(x, t, y)
        assert relative_error(dynamic(x, t, y), ref) < relative_error(static(x, t, y), ref)  # per-sample scales fit better
    with pytest.raises(ConfigError):
        export_onnx(builtin, tmp_path / "d.onnx", recipe=recipe, tensors=tensors)
