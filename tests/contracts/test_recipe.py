"""A recipe folder that contradicts the registry, or holds non-finite tensors, is refused at load:
one line, exit 2, before any work, from every command that reads recipes."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ditrt.cli import main
from ditrt.contracts.errors import ArtifactError
from ditrt.contracts.recipe import load_recipe, save_recipe
from ditrt.models.builtin import load_model
from tests.export.recipes import absmax_recipe


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory):
    torch.set_num_threads(1)
    recipe, tensors = absmax_recipe(load_model("builtin"), "w8a8", quantize_all=False)
    return save_recipe(recipe, tensors, tmp_path_factory.mktemp("r") / "recipe")


def _edited(recipe_dir, tmp_path, **fields):
    out = tmp_path / "edited"
    out.mkdir()
    (out / "weights.safetensors").write_bytes((recipe_dir / "weights.safetensors").read_bytes())
    d = json.loads((recipe_dir / "recipe.json").read_text())
    d.update(fields)
    (out / "recipe.json").write_text(json.dumps(d))
    return out


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"precision": "w3a3"}, "unknown precision 'w3a3'"),
        ({"method": "gptq"}, "unknown method 'gptq'"),
        ({"weight_bits": 4}, "but w8a8 is w8/a8"),
    ],
)
def test_an_edited_recipe_is_refused_by_every_reader(recipe_dir, tmp_path, fields, message):
    bad = _edited(recipe_dir, tmp_path, **fields)
    with pytest.raises(ArtifactError, match="re-run `ditrt calibrate`"):
        load_recipe(bad)
    for args in (["export", "--recipe", str(bad), "--out", str(tmp_path / "m.onnx")],
                 ["sample", str(bad), "--steps", "3", "--num", "1", "--out", str(tmp_path / "s")]):  # fmt: skip
        r = CliRunner().invoke(main, args)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("ditrt: error:") and message in lines[0], r.output
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "s").exists()


def test_non_finite_recipe_tensors_are_refused(recipe_dir, tmp_path):
    bad = _edited(recipe_dir, tmp_path)
    tensors = load_file(str(bad / "weights.safetensors"))
    key = next(k for k in tensors if k.endswith("input_scale"))
    tensors[key] = torch.tensor(float("nan"))
    save_file(tensors, str(bad / "weights.safetensors"))
    with pytest.raises(ArtifactError, match=f"NaN or infinite values in {key}"):
        load_recipe(bad)
