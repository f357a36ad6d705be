import pytest
import torch

from ditrt.contracts.errors import ConfigError, InputError
from ditrt.diffusion.sampler import SamplerConfig, guided_output, sample
from ditrt.diffusion.schedule import linear_betas
from tests.conftest import TINY, random_dit

SHAPE = (4, 8, 8)


def _run(model, cfg, labels=(1, 2, 3), seeds=(5, 6, 7)):
    return sample(model, cfg, list(labels), list(seeds), num_classes=10, image_shape=SHAPE)


def test_seeded_run_is_bit_reproducible(tiny_dit):
    cfg = SamplerConfig(steps="20", cfg_scale=1.5)
    assert torch.equal(_run(tiny_dit, cfg), _run(tiny_dit, cfg))
    assert not torch.equal(_run(tiny_dit, cfg), _run(tiny_dit, cfg, seeds=(5, 6, 8)))


def test_a_sample_depends_only_on_its_own_seed_and_label(tiny_dit):
    cfg = SamplerConfig(steps="10")
    full = _run(tiny_dit, cfg)
    alone = _run(tiny_dit, cfg, labels=(2,), seeds=(6,))
    assert torch.allclose(full[1], alone[0], atol=1e-5)


class _Oracle:
    """The exact denoiser for data that is a single point c: eps = (x - sqrt(acp) c) / sqrt(1 - acp)."""

    def __init__(self, c):
        self.c = c
        self.acp = torch.cumprod(1 - linear_betas(), 0)

    def __call__(self, x, t, y):
        a = self.acp[t.long()].to(x.dtype).view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.c) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1)


@pytest.mark.parametrize("steps", ["250", "50", "ddim50"])
def test_golden_oracle_denoiser_recovers_the_data_point(steps):
    c = torch.linspace(-0.8, 0.8, 64).view(1, 1, 8, 8)
    x = sample(_Oracle(c), SamplerConfig(steps=steps, cfg_scale=1.0), [0, 1], [0, 1], num_classes=2, image_shape=(1, 8, 8))
    assert torch.allclose(x, c.expand(2, -1, -1, -1), atol=1e-4)


def test_cfg_scale_one_is_the_conditional_model(tiny_dit):
    x, t, y = torch.randn(2, *SHAPE), torch.tensor([3.0, 3.0]), torch.tensor([1, 2])
    assert torch.equal(guided_output(tiny_dit, x, t, y, null_class=10, cfg_scale=1.0, guidance="official"), tiny_dit(x, t, y))


def test_guidance_channels_official_vs_all(tiny_dit):
    x, t, y = torch.randn(2, *SHAPE), torch.tensor([3.0, 3.0]), torch.tensor([1, 2])
    cond, uncond = tiny_dit(x, t, y), tiny_dit(x, t, torch.tensor([10, 10]))
    off = guided_output(tiny_dit, x, t, y, null_class=10, cfg_scale=4.0, guidance="official")
    all_ = guided_output(tiny_dit, x, t, y, null_class=10, cfg_scale=4.0, guidance="all")
    guided = uncond + 4.0 * (cond - uncond)
    assert torch.allclose(off[:, :3], guided[:, :3], atol=1e-5) and torch.allclose(off[:, 3:], cond[:, 3:], atol=1e-6)
    assert torch.allclose(all_[:, :4], guided[:, :4], atol=1e-5) and torch.allclose(all_[:, 4:], cond[:, 4:], atol=1e-6)


def test_cfg_batches_cond_first_then_null_in_one_call():
    calls = []

    def spy(x, t, y):
        calls.append(y.tolist())
        return torch.zeros(x.shape[0], 8, 8, 8)

    sample(spy, SamplerConfig(steps="3"), [4, 5], [0, 1], num_classes=10, image_shape=SHAPE)
    assert calls == [[4, 5, 10, 10]] * 3


def test_class_ids_out_of_range_and_bad_settings_are_user_errors(tiny_dit):
    with pytest.raises(InputError, match="class id 10 is out of range"):
        _run(tiny_dit, SamplerConfig(steps="5"), labels=(1, 10, 2))
    with pytest.raises(InputError, match="one seed per label"):
        _run(tiny_dit, SamplerConfig(steps="5"), labels=(1, 2), seeds=(1,))
    with pytest.raises(ConfigError):
        SamplerConfig(steps="0")
    with pytest.raises(ConfigError):
        SamplerConfig(cfg_scale=0.5)


def test_ddim_is_deterministic_given_x_T():
    m = random_dit(TINY)
    a = _run(m, SamplerConfig(steps="ddim10", cfg_scale=1.0))
    b = _run(m, SamplerConfig(steps="ddim10", cfg_scale=1.0))
    assert torch.equal(a, b) and torch.isfinite(a).all()


def _seeded_noise(seeds, steps: int):
    """x_T and the per-step noise the seeded generators draw, in the sampler's order."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x_T = torch.stack([torch.randn(SHAPE, generator=g) for g in gens])
    per_step = torch.stack([torch.stack([torch.randn(SHAPE, generator=g) for g in gens]) for _ in range(steps - 1)])
    return x_T, per_step


@pytest.mark.parametrize("steps", ["12", "ddim12"])
def test_given_noise_equal_to_the_seeded_noise_reproduces_the_seeded_run_bit_for_bit(tiny_dit, steps):
    cfg = SamplerConfig(steps=steps, cfg_scale=1.5)
    seeded = _run(tiny_dit, cfg)
    x_T, per_step = _seeded_noise((5, 6, 7), 12)
    kw = {"num_classes": 10, "image_shape": SHAPE}
    only_x_T = sample(tiny_dit, cfg, [1, 2, 3], [5, 6, 7], noise=x_T, **kw)
    as_tensor = sample(tiny_dit, cfg, [1, 2, 3], [0, 0, 0], noise=x_T, step_noise=per_step, **kw)
    official_layout = torch.cat([per_step, torch.zeros(1, 3, *SHAPE)])  # S = steps: the last one is drawn and unused
    as_callable = sample(tiny_dit, cfg, [1, 2, 3], [0, 0, 0], noise=x_T, step_noise=lambda k: official_layout[k], **kw)
    for other in (only_x_T, as_tensor, as_callable):
        assert torch.equal(other, seeded)
    other_noise = sample(tiny_dit, cfg, [1, 2, 3], [5, 6, 7], noise=x_T + 0.1, **kw)
    assert not torch.equal(other_noise, seeded)


def test_batched_generation_splits_given_noise_by_rows(tiny_dit):
    from ditrt.diffusion.sample_set import generate

    cfg = SamplerConfig(steps="6")
    x_T, per_step = _seeded_noise((5, 6, 7), 6)
    kw = {"num_classes": 10, "image_shape": SHAPE}
    whole = generate(tiny_dit, cfg, [1, 2, 3], [0, 0, 0], noise=x_T, step_noise=per_step, batch_size=3, **kw)
    split = generate(tiny_dit, cfg, [1, 2, 3], [0, 0, 0], noise=x_T, step_noise=per_step, batch_size=2, **kw)
    seeded = generate(tiny_dit, cfg, [1, 2, 3], [5, 6, 7], batch_size=3, **kw)
    assert (whole == seeded).all()
    assert abs(whole - split).max() <= 1e-5 * abs(whole).max()  # other batch shapes round differently, as for seeded runs
    with pytest.raises(InputError, match="batch-size must be a positive"):
        generate(tiny_dit, cfg, [1], [0], batch_size=0, **kw)


def test_given_noise_of_the_wrong_shape_is_refused(tiny_dit):
    kw = {"num_classes": 10, "image_shape": SHAPE}
    with pytest.raises(InputError, match=r"noise must have shape \(3, 4, 8, 8\)"):
        sample(tiny_dit, SamplerConfig(steps="5"), [1, 2, 3], [5, 6, 7], noise=torch.zeros(2, *SHAPE), **kw)
    with pytest.raises(InputError, match="step_noise must have shape"):
        sample(tiny_dit, SamplerConfig(steps="5"), [1, 2, 3], [5, 6, 7], step_noise=torch.zeros(2, 3, *SHAPE), **kw)


class _NanAtCall:
    """A finite denoiser that returns NaN from its ``bad``-th call on (1-based)."""

    def __init__(self, model, bad: int, value=float("nan")):
        self.model, self.bad, self.value, self.calls = model, bad, value, 0

    def __call__(self, x, t, y):
        self.calls += 1
        out = self.model(x, t, y)
        if self.calls >= self.bad:
            out = out.clone()
            out[0, 0, 0, 0] = self.value
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_denoiser_returning_nan_stops_the_run_at_that_step(tiny_dit, value):
    from ditrt.diffusion.sampler import NonFiniteOutputError
    from ditrt.diffusion.schedule import make_schedule

    bad = _NanAtCall(tiny_dit, 3, value)
    with pytest.raises(NonFiniteOutputError, match=r"NaN/inf at step 3 of 10 \(t=(\d+)\): check the model's weights") as e:
        _run(bad, SamplerConfig(steps="10", cfg_scale=1.5))
    assert bad.calls == 3  # stopped there: no later step ran
    assert isinstance(e.value, InputError)
    t3 = int(make_schedule("10").timestep_map[10 - 3])
    assert f"(t={t3})" in str(e.value)


class _DeviceChecked:
    """Wraps a denoiser and asserts, at every call, what the sampler hands it and gets back: x and t
    float32, y int64, all three on ``device``, and an output on that device too."""

    def __init__(self, denoiser, device):
        self.denoiser, self.device, self.calls = denoiser, torch.device(device), 0

    def __call__(self, x, t, y):
        self.calls += 1
        assert (x.dtype, t.dtype, y.dtype) == (torch.float32, torch.float32, torch.int64)
        assert x.device == t.device == y.device == self.device, (x.device, t.device, y.device)
        out = self.denoiser(x, t, y)
        assert out.device == self.device and out.shape == (x.shape[0], 2 * x.shape[1], *x.shape[2:])
        return out


class _Transfers(torch.overrides.TorchFunctionMode):
    """Counts the torch calls that return a tensor on another device than their first tensor argument."""

    def __init__(self):
        super().__init__()
        self.moves: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor) and args[0].device != out.device:
            self.moves.append((args[0].device.type, out.device.type))
        return out


@pytest.mark.parametrize("steps", ["6", "ddim6"])
def test_the_loop_stays_on_its_device_and_never_reads_back_a_step(steps):
    """The whole DDPM/DDIM loop on the 'meta' device, around a real tiny DiT moved there: a meta tensor
    has no values, so any per-step read back to the host (``.item()``, ``bool()``, ``.cpu()``) would
    raise, and so would most ops mixing a host tensor into the math. What this does not see: a
    0-dim host tensor (allowed next to any device), and whether a GPU kernel would be fast."""
    model = _DeviceChecked(random_dit(TINY).to("meta"), "meta")
    cfg = SamplerConfig(steps=steps, cfg_scale=1.5)
    x = sample(model, cfg, [1, 2, 3], [5, 6, 7], num_classes=10, image_shape=SHAPE, device="meta")
    assert x.device.type == "meta" and x.shape == (3, *SHAPE) and model.calls == 6


def test_host_to_device_copies_are_one_per_step_the_seeded_noise():
    """Everything else (the schedule's coefficients, labels, x_T) moves once per run: ten more steps
    cost exactly ten more copies, each of the noise the CPU generators draw for that step."""
    model = random_dit(TINY).to("meta")
    counts = {}
    for n in (5, 15):
        with _Transfers() as seen:
            sample(model, SamplerConfig(steps=str(n)), [1, 2], [5, 6], num_classes=10, image_shape=SHAPE, device="meta")
        assert set(seen.moves) == {("cpu", "meta")}  # nothing ever comes back
        counts[n] = len(seen.moves)
    assert counts[15] - counts[5] == 10


def test_noise_for_any_device_comes_from_the_seeded_cpu_generators():
    """x_T for another device is drawn by per-sample CPU generators (a CUDA generator would draw other
    numbers): after it, each generator is exactly one draw into the seed's CPU stream."""
    from ditrt.diffusion.sampler import initial_noise

    x, gens = initial_noise([5, 6], SHAPE, device="meta")
    assert x.device.type == "meta" and x.shape == (2, *SHAPE) and all(g.device.type == "cpu" for g in gens)
    for seed, g in zip((5, 6), gens):
        ref = torch.Generator().manual_seed(seed)
        torch.randn(SHAPE, generator=ref)
        assert torch.equal(torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=ref))


def test_the_deferred_finite_check_names_the_first_bad_step():
    """The check a GPU run uses (the flag stays on the device, read every few steps and at the end), here on CPU tensors."""
    from ditrt.diffusion.sampler import NonFiniteOutputError, _FiniteCheck
    from ditrt.diffusion.schedule import make_schedule

    schedule = make_schedule("10")
    good, bad = torch.zeros(2, 8), torch.full((2, 8), float("nan"))
    check = _FiniteCheck(schedule, torch.device("cpu"), every=4)
    for k in range(2):
        check(good, k)
    check(bad, 2)  # not read yet: no error before the 4th step
    with pytest.raises(NonFiniteOutputError, match=f"at step 3 of 10 \\(t={int(schedule.timestep_map[7])}\\)"):
        check(good, 3)
    late = _FiniteCheck(schedule, torch.device("cpu"), every=4)
    for k in range(6):
        late(bad if k == 5 else good, k)
    with pytest.raises(NonFiniteOutputError, match="at step 6 of 10"):
        late.done()  # the end of the run reads it too
    _FiniteCheck(schedule, torch.device("meta"), every=4).done()  # nothing to read on meta


def test_timestep_groups_are_picked_on_the_host():
    """A two-group denoiser (one engine per activation-scale group, as TensorRT manifests run) sampled on
    'meta': its groups are chosen from the host's timestep (at_timestep), so t is never read back from
    the device (a meta t cannot be read), and each step reaches the group of its timestep."""
    from ditrt.diffusion.schedule import make_schedule
    from ditrt.runtime.groups import TimestepGroupDenoiser

    model, seen = random_dit(TINY).to("meta"), []

    def group(g):
        return lambda x, t, y: seen.append(g) or model(x, t, y)

    both = TimestepGroupDenoiser([group(0), group(1)], (500.0,))
    sample(both, SamplerConfig(steps="8"), [1, 2], [5, 6], num_classes=10, image_shape=SHAPE, device="meta")
    expected = [int(t < 500) for t in reversed(make_schedule("8").timestep_map.tolist())]
    assert seen == expected and set(seen) == {0, 1}
