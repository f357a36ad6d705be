from pathlib import Path

import pytest

from ditrt.contracts.errors import ArtifactError, ConfigError
from ditrt.contracts.profile import BuildConfig, ShapeRange, parse_batch, profile_from_dict, profile_shapes, profile_to_dict
from ditrt.engines.onnx_info import read_onnx

DIT_INPUTS = {"x": ("N", 4, 32, 32), "t": ("N",), "y": ("N",)}


def test_guidance_doubles_opt_and_max_but_not_min():
    assert BuildConfig(batch_min=1, batch_opt=4, batch_max=16).engine_batch == (1, 8, 32)
    assert BuildConfig(batch_min=2, batch_opt=4, batch_max=16, cfg=False).engine_batch == (2, 4, 16)


def test_profile_covers_the_doubled_guidance_batch():
    # a user sampling up to 16 images at once with guidance sends 32 rows per call
    shapes = profile_shapes(DIT_INPUTS, BuildConfig(batch_min=1, batch_opt=8, batch_max=16))
    assert shapes["x"] == ShapeRange((1, 4, 32, 32), (16, 4, 32, 32), (32, 4, 32, 32))
    assert shapes["t"] == ShapeRange((1,), (16,), (32,))
    assert shapes["y"] == ShapeRange((1,), (16,), (32,))
    unguided = profile_shapes(DIT_INPUTS, BuildConfig(batch_min=1, batch_opt=8, batch_max=16, cfg=False))
    assert unguided["x"].max == (16, 4, 32, 32)


@pytest.mark.parametrize("batch_dim", ["N", "batch", None, 0, -1])
def test_any_dynamic_spelling_of_the_batch_axis(batch_dim):
    shapes = profile_shapes({"x": (batch_dim, 1, 8, 8)}, BuildConfig(batch_min=2, batch_opt=2, batch_max=3))
    assert shapes["x"] == ShapeRange((2, 1, 8, 8), (4, 1, 8, 8), (6, 1, 8, 8))


def test_profile_from_a_real_onnx_file(tiny_onnx):
    summary = read_onnx(tiny_onnx)
    assert summary.inputs == {"x": ("N", 4, 8, 8), "t": ("N",), "y": ("N",)}
    assert summary.input_dtypes == {"x": "FLOAT", "t": "FLOAT", "y": "INT64"}
    shapes = profile_shapes(summary.inputs, BuildConfig(batch_min=1, batch_opt=2, batch_max=4))
    assert shapes["x"] == ShapeRange((1, 4, 8, 8), (4, 4, 8, 8), (8, 4, 8, 8))


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"x": (2, 4, 8, 8)}, "fixed batch of 2"),
        ({"x": ("N", 4, "H", "W")}, "dynamic non-batch axes [2, 3]"),
        ({"t": ()}, "scalar"),
        ({}, "no inputs"),
    ],
)
def test_unbuildable_input_layouts_are_refused(inputs, message):
    with pytest.raises(ArtifactError, match="re-export") as e:
        profile_shapes(inputs, BuildConfig())
    assert message in str(e.value)


def test_profile_json_round_trip():
    shapes = profile_shapes(DIT_INPUTS, BuildConfig())
    assert profile_from_dict(profile_to_dict(shapes)) == shapes


@pytest.mark.parametrize(
    "text, expected", [("1:8:16", (1, 8, 16)), (" 2:4:4 ", (2, 4, 4)), ("8", (1, 8, 8)), ("1:1:1", (1, 1, 1))]
)
def test_parse_batch(text, expected):
    assert parse_batch(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("1:8", "MIN:OPT:MAX"),
        ("1:8:16:32", "MIN:OPT:MAX"),
        ("a:b:c", "whole numbers"),
        ("1.5:2:4", "whole numbers"),
        ("", "whole numbers"),
        ("0:4:8", "at least 1"),
        ("-1:4:8", "at least 1"),
        ("4:2:8", "MIN <= OPT <= MAX"),
        ("1:16:8", "MIN <= OPT <= MAX"),
    ],
)
def test_parse_batch_errors_say_what_is_expected(text, message):
    with pytest.raises(ConfigError, match="--batch") as e:
        parse_batch(text)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_min": 0}, "positive integer"),
        ({"batch_min": 8, "batch_opt": 4}, "min <= opt <= max"),
        ({"opt_level": 6}, "0-5"),
        ({"workspace": 0}, "workspace"),
    ],
)
def test_build_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BuildConfig(**kwargs)


def test_build_config_round_trip_and_paths():
    c = BuildConfig(
        batch_min=1, batch_opt=2, batch_max=8, cfg=False, opt_level=5, timing_cache="cache/t.cache", workspace=1 << 30
    )
    assert c.timing_cache == Path("cache/t.cache")
    d = c.to_dict()
    assert d["timing_cache"] == "cache/t.cache"
    assert BuildConfig.from_dict(d) == c


def test_images_per_call_reads_an_engines_rows_back():
    from ditrt.contracts.profile import images_per_call

    assert images_per_call(None, guided=True) is None  # a graph with a dynamic batch takes any
    assert images_per_call(32, guided=True) == 16 and images_per_call(32, guided=False) == 32
    assert images_per_call(7, guided=True) == 3  # an odd row count: whole images only
    with pytest.raises(ConfigError, match=r"m.plan takes 1..1 rows per call and guidance needs 2 rows.*--cfg-scale 1"):
        images_per_call(1, guided=True, source="m.plan")  # a --no-cfg engine of one row, sampled with guidance
    with pytest.raises(ConfigError, match="3..3 rows per call"):
        images_per_call(3, guided=True, min_rows=3)  # 1 image = 2 rows: below the engine's minimum


@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("images", [1, 2, 3, 4, 16])
def test_an_engine_sized_for_the_calls_of_a_run_takes_them_all(images, guided):
    """--num 1..3 used to put the default opt batch (4) above max; the sized engine's opt is the chunk."""
    from ditrt.contracts.profile import build_for_calls, images_per_call, rows_per_image

    config = build_for_calls(images, guided=guided, rows=8)
    lo, opt, hi = config.engine_batch
    k = rows_per_image(guided)
    assert lo == 1 and opt == k * images and opt <= hi and hi >= 8  # also the 8-row comparison inputs
    assert images_per_call(hi, guided=guided) >= images
    assert profile_shapes(DIT_INPUTS, config)["x"].opt == (opt, 4, 32, 32)
    with pytest.raises(ConfigError, match="at least one image"):
        build_for_calls(0, guided=guided)
