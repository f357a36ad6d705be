"""Sampling in shards (ditrt.diffusion.shards) on a tiny random DiT: the plan, a run that fails after
one shard and resumes to the one-shot result, shards of another run refused, the streamed merge."""

import json
import os

import numpy as np
import pytest

from ditrt.contracts.errors import ConfigError
from ditrt.diffusion.sample_set import SampleSet, adm_uint8, default_labels, generate, preview_indices
from ditrt.diffusion.sampler import SamplerConfig
from ditrt.diffusion.shards import ShardPlan, file_identity, find_resume, merge_shards, sample_shards, shard_samples
from ditrt.distributed import World, my_chunks
from tests.conftest import TINY, random_dit

SAMPLER = SamplerConfig(steps="3", cfg_scale=1.5)
RUN = {"artifact": {"path": "tiny", "size": 1}, "sampler": SAMPLER.to_dict(), "seed": 0, "classes": None}


@pytest.fixture(scope="module")
def model():
    return random_dit(TINY)


def _draw(model, calls=None, fail_at=None):
    def draw(labels, seeds, on_step):
        if calls is not None:
            calls.append(seeds[0])
        if fail_at is not None and seeds[0] == fail_at:
            raise RuntimeError("the process dies here")
        return generate(model, SAMPLER, labels, seeds, num_classes=10, image_shape=(4, 8, 8), batch_size=len(labels), on_step=on_step)

    return draw


def _run(plan, draw, run=RUN, **kw):
    labels = default_labels(plan.num, 10)
    seeds = list(range(plan.num))
    return sample_shards(plan, draw, labels=labels, seeds=seeds, kind="latents", run=run, steps=3, progress=False, **kw)


def _merge(plan, run=RUN, **kw):
    labels = default_labels(plan.num, 10)
    seeds = list(range(plan.num))
    return merge_shards(plan, kind="latents", labels=labels, seeds=seeds, settings={"s": 1}, run=run, progress=False, **kw)


def test_the_plan_cuts_fixed_chunks_that_every_world_size_covers_once(tmp_path):
    plan = ShardPlan(tmp_path, 5, 2)
    assert plan.chunks == [range(0, 2), range(2, 4), range(4, 5)]
    assert [plan.path(r).name for r in plan.chunks] == ["00000-00001.npz", "00002-00003.npz", "00004-00004.npz"]
    assert plan.folder == tmp_path / "shards" and plan.samples.name == "samples.npz" and plan.adm.name == "adm_samples.npz"
    for size in (1, 2, 3, 4):
        taken = [c for r in range(size) for c in my_chunks(len(plan.chunks), World(r, size))]
        assert sorted(taken) == [0, 1, 2]
    assert [c for c in my_chunks(3, World(1, 2))] == [1]
    for bad in (dict(num=0, batch_size=2), dict(num=4, batch_size=0)):
        with pytest.raises(ConfigError, match="must be a? ?positive"):
            ShardPlan(tmp_path, **bad)


def test_a_run_that_dies_after_one_shard_resumes_to_the_one_shot_result(tmp_path, model):
    one = ShardPlan(tmp_path / "one", 6, 2)
    _run(one, _draw(model))
    _merge(one)
    assert not one.folder.exists()  # merged, then removed
    reference = SampleSet.load(one.samples)
    assert reference.data.shape == (6, 4, 8, 8) and reference.settings == {"s": 1, "run": RUN}

    plan = ShardPlan(tmp_path / "two", 6, 2)
    with pytest.raises(RuntimeError, match="dies"):
        _run(plan, _draw(model, fail_at=2))  # the second chunk (samples 2, 3) fails
    assert sorted(p.name for p in plan.folder.iterdir()) == ["00000-00001.npz"]  # a finished shard, no partial file
    first = plan.path(range(0, 2))
    os.utime(first, ns=(1, 1))  # a recognisable mtime: rewriting it would change it
    calls = []
    found = _run(plan, _draw(model, calls))
    assert found.done == (0,) and calls == [2, 4] and first.stat().st_mtime_ns == 1
    _merge(plan)
    resumed = SampleSet.load(plan.samples)
    assert all(np.array_equal(getattr(resumed, k), getattr(reference, k)) for k in ("data", "labels", "seeds"))
    assert resumed.settings == reference.settings
    assert find_resume(plan, RUN, default_labels(6, 10), range(6)).complete  # a re-run of the finished run has nothing to do
    assert not find_resume(plan, RUN, default_labels(6, 10), range(6), adm=True).complete  # ... unless it also wants the ADM npz


def test_a_shard_of_another_run_is_refused_naming_the_difference(tmp_path, model):
    plan = ShardPlan(tmp_path, 2, 2)
    _run(plan, _draw(model), run={**RUN, "seed": 1})
    before = plan.path(range(0, 2)).read_bytes()
    with pytest.raises(ConfigError) as e:
        _run(plan, _draw(model))
    msg = str(e.value)
    assert "is a shard of another run (seed 1 there, 0 here)" in msg and "--overwrite" in msg and "another --out" in msg
    assert plan.path(range(0, 2)).read_bytes() == before  # refused, untouched
    with pytest.raises(ConfigError, match="another artifact"):
        _run(plan, _draw(model), run={**RUN, "seed": 1, "artifact": {"path": "tiny", "size": 2}})
    found = _run(plan, _draw(model), overwrite=True)
    assert found.done == () and json.loads(str(np.load(plan.path(range(0, 2)))["run"]))["seed"] == 0


def test_the_merge_streams_shards_into_samples_and_the_adm_batch(tmp_path):
    """Images in [-1, 1] and beyond: arr_0 is clamp(127.5 x + 128, 0, 255) truncated, as DiT's sample_ddp.py."""
    rng = np.random.default_rng(0)
    images = rng.uniform(-1.1, 1.1, (5, 3, 4, 4)).astype(np.float32)
    images[0, 0, 0, :2] = [1.0, -1.0]
    plan = ShardPlan(tmp_path, 5, 2)
    labels = [3, 1, 4, 1, 5]
    sample_shards(plan, lambda lab, sds, on_step: images[sds[0] : sds[-1] + 1], labels=labels, seeds=range(5), kind="images",
                  run=RUN, steps=1, progress=False)  # fmt: skip
    (tmp_path / "adm_samples.npz").write_bytes(b"an earlier run's")
    assert np.array_equal(shard_samples(plan, [4, 0, 3], kind="images"), images[[0, 3, 4]])
    merge_shards(plan, kind="images", labels=labels, seeds=range(5), settings={}, run=RUN, keep=True, progress=False)
    assert not plan.adm.exists()  # not asked for: a stale batch is not left beside these samples
    assert np.array_equal(SampleSet.load(plan.samples).data, images) and len(list(plan.folder.glob("*.npz"))) == 3
    merge_shards(plan, kind="images", labels=labels, seeds=range(5), settings={}, run=RUN, adm=True, progress=False)
    z = np.load(plan.adm, allow_pickle=False)
    assert sorted(z.keys()) == ["arr_0", "arr_1"] and z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (5, 4, 4, 3)
    expected = np.clip(np.float32(127.5) * images + np.float32(128.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(z["arr_0"], expected) and np.array_equal(z["arr_0"], adm_uint8(images))
    assert z["arr_0"][0, 0, 0, 0] == 255 and z["arr_0"][0, 0, 1, 0] == 0 and z["arr_1"].tolist() == labels
    assert not plan.folder.exists()


def test_file_identity_changes_with_the_file_and_preview_is_bounded(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"12")
    a = file_identity(f)
    os.utime(f, ns=(5, 5))
    assert file_identity(f) != a and file_identity(tmp_path)["files"] == {"m.safetensors": [2, 5]}
    labels = default_labels(50_000, 1000)
    shown = preview_indices(labels)
    assert len(shown) == 100 and len({labels[i] for i in shown}) == 10 and shown[:3] == [0, 1, 2]
