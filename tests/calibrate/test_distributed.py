"""Calibration shared over processes, the parts a single process can check: recorded chunks put back
in sample order (with guidance: every chunk's conditional rows, then every chunk's null-class rows),
and the observation passes' slices, whose statistics do not depend on how many there are."""

import torch

from ditrt.calibrate.observe import capture_layer_inputs, observe_linear_inputs, slices
from ditrt.contracts.recipe import CalibrationSettings
from ditrt.diffusion.recording import record_calibration_inputs
from tests.conftest import TINY, random_dit


def test_chunked_recording_is_the_single_batch_recording_in_sample_order():
    model = random_dit(TINY)
    settings = CalibrationSettings(steps="10", timesteps=3, samples=5)
    whole = record_calibration_inputs(model, settings, chunk=5)
    chunked = record_calibration_inputs(model, settings, chunk=2)  # chunks of 2, 2 and 1 samples
    assert len(whole) == len(chunked) == 3
    for (xw, tw, yw), (xc, tc, yc) in zip(whole, chunked):
        assert xc.shape == (10, 4, 8, 8) and torch.equal(tc, tw) and torch.equal(yc, yw)
        assert (yc[:5] < TINY.num_classes).all() and (yc[5:] == TINY.num_classes).all()
        assert torch.equal(xc[:5], xc[5:])  # each sample's null-class row is its conditional row's twin
        torch.testing.assert_close(xc, xw, rtol=0, atol=1e-3)  # the same trajectories: only a batch's rounding differs
    assert torch.equal(chunked[0][0], whole[0][0])  # the first recorded step is the seeded noise itself, bit for bit
    unguided = record_calibration_inputs(model, CalibrationSettings(steps="10", timesteps=2, samples=3, cfg_scale=1.0), chunk=2)
    x, _, y = unguided[0]
    assert x.shape == (3, 4, 8, 8) and torch.equal(y, whole[0][2][:3])


def test_slice_size_does_not_change_the_statistics():
    """Maxima reduce over slices and the value subsets are chosen by index in the whole batch: the rows
    per slice (the unit ranks share) change what runs together, not what is kept."""
    model = random_dit(TINY)
    batches = record_calibration_inputs(model, CalibrationSettings(steps="10", timesteps=2, samples=6))
    layers = ["blocks.0.attn.qkv", "blocks.1.mlp.fc2"]
    assert [(s.start, s.stop) for s in slices(batches, rows=5)][:3] == [(0, 5), (5, 10), (10, 12)]
    (stats_a, rows_a), (stats_b, rows_b) = [
        (observe_linear_inputs(model, layers, batches, samples_per_batch=500, seed=3, rows=rows),
         capture_layer_inputs(model, layers, batches, tokens_per_batch=20, seed=3, rows=rows))
        for rows in (12, 5)
    ]  # fmt: skip
    for name in layers:
        a, b = stats_a[name], stats_b[name]
        torch.testing.assert_close(a.channel_max_by_step(), b.channel_max_by_step(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.sample_values(), b.sample_values(), rtol=1e-5, atol=1e-6)
        assert a.sample_values().numel() == 2 * 500 and a.min < 0 < a.max <= a.absmax
        torch.testing.assert_close(rows_a[name].rows, rows_b[name].rows, rtol=1e-5, atol=1e-6)
        assert rows_a[name].rows.shape == (2 * 20, model.get_submodule(name).in_features)
