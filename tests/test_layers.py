"""The layers, bottom up: contracts < foundations < calibrate < export < engines < runtime < compare/cli.

A module may import its own layer or a lower one. Imports are read from the source (every
``import``/``from ... import`` anywhere in a module, relative ones resolved, ``from ditrt import x``
taken as ``ditrt.x``, and ``importlib.import_module("ditrt....")`` with a literal name), so a lazy
import inside a function counts as much as one at the top.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ditrt

ROOT = Path(ditrt.__file__).parent
#: top-level package or module -> its layer
LAYER_OF = {
    "contracts": "contracts", "__init__": "contracts",
    "models": "foundation", "diffusion": "foundation", "data": "foundation", "quality": "foundation", "training": "foundation", "distributed": "foundation",
    "calibrate": "calibrate", "export": "export", "engines": "engines", "runtime": "runtime",
    "compare": "compare", "pipeline": "compare", "cli": "cli", "__main__": "cli",
}  # fmt: skip
ORDER = ["contracts", "foundation", "calibrate", "export", "engines", "runtime", "compare", "cli"]


def layer_of(module: str) -> str:
    parts = module.split(".")
    return LAYER_OF[parts[1] if len(parts) > 1 else "__init__"]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("ditrt", *parts))


def imports(path: Path, root: Path = ROOT):
    """Every ditrt module ``path`` imports, as absolute dotted names."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "ditrt":  # from ditrt import x: x is a module (or the version, which lives in ditrt/__init__)
                yield from (f"ditrt.{a.name}" if a.name != "__version__" else "ditrt" for a in node.names)
            else:
                yield mod
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                yield node.args[0].value


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        mine = layer_of(mod)
        for imp in imports(path, root):
            if imp == "ditrt" or not imp.startswith("ditrt."):
                continue
            if ORDER.index(layer_of(imp)) > ORDER.index(mine):
                bad.append(f"{mod} ({mine}) imports {imp} ({layer_of(imp)})")
    return bad


def test_no_module_imports_a_later_layer():
    bad = violations()
    assert not bad, "\n".join(bad)


def test_every_package_and_module_has_a_layer():
    for path in ROOT.iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            assert path.name in LAYER_OF, path.name
        elif path.suffix == ".py":
            assert path.stem in LAYER_OF, path.name


@pytest.mark.parametrize(
    "source",
    [
        "from ditrt import export\n",
        "from ..export import qdq\n",
        "import importlib\nimportlib.import_module('ditrt.export.qdq')\n",
        "def f():\n    from ditrt.runtime import groups\n",
    ],
)
def test_the_import_reader_sees_every_form(tmp_path, source):
    """A contracts module importing a stage is caught whatever the import's spelling."""
    fake = tmp_path / "ditrt"
    (fake / "contracts").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "contracts" / "__init__.py").write_text("")
    (fake / "contracts" / "bad.py").write_text(source)
    found = [v for v in violations(fake) if "contracts.bad" in v]
    assert found, source


DEPLOYMENT = ["ditrt.runtime.onnxruntime_backend", "ditrt.runtime.tensorrt_backend", "ditrt.runtime.groups", "ditrt.runtime.open"]
AUTHORING = ("ditrt.calibrate", "ditrt.export", "ditrt.training", "ditrt.models", "ditrt.compare", "ditrt.pipeline")


@pytest.fixture(scope="module")
def deployment_imports() -> dict[str, str]:
    """module -> the authoring (or TensorRT) modules that importing it loaded, in one fresh interpreter that
    imports the deployment modules one after another: the union of their imports, each named by the first
    module that loaded it (one torch start-up instead of one per module)."""
    code = (
        "import importlib, sys\n"
        f"bad = lambda: {{m for m in sys.modules if m.startswith({AUTHORING!r}) or m in ('tensorrt', 'polygraphy.backend.trt')}}\n"
        "for module in sys.argv[1:]:\n"
        "    before = bad()\n"
        "    importlib.import_module(module)\n"
        "    print(module, *sorted(bad() - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *DEPLOYMENT], check=True, capture_output=True, text=True).stdout
    lines = dict(line.partition(" ")[::2] for line in out.splitlines())
    assert set(lines) == set(DEPLOYMENT), out
    return lines


@pytest.mark.parametrize("module", DEPLOYMENT)
def test_the_deployment_path_loads_no_authoring_module(module, deployment_imports):
    """Importing a runtime loads no calibration, export or model-authoring code (and no TensorRT)."""
    assert deployment_imports[module] == "", f"importing {module} loads {deployment_imports[module]}"


def test_the_cli_starts_without_importing_torch():
    """`ditrt --help` and Ctrl-C handling come before torch's seconds of import: the CLI, the option
    definitions and the registries they read (precisions, methods, the torchrun World) are torch-free."""
    code = "import sys, ditrt.cli; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout
