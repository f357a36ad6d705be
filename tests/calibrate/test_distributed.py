"""Calibration shared over processes, the parts a single process can check: recorded chunks put back
in sample order (with guidance: every chunk's conditional rows, then every chunk's null-class rows)."""

import torch

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
