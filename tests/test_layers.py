"""The stages flow one way: foundations <- calibrate <- export <- engines <- runtime <- compare/cli."""

import ast
from pathlib import Path

import ditrt

ROOT = Path(ditrt.__file__).parent
FOUNDATION = {"errors", "models", "diffusion", "data", "recipe", "quality", "training", "__init__"}
ORDER = ["foundation", "calibrate", "export", "engines", "runtime", "compare", "pipeline", "cli"]


def layer_of(module: str) -> str:
    top = module.split(".")[1] if module.count(".") else "__init__"
    if top == "__main__":
        return "cli"
    return "foundation" if top in FOUNDATION else top


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_no_module_imports_a_later_stage():
    bad = []
    for path in ROOT.rglob("*.py"):
        mod = "ditrt." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mine = layer_of(mod)
        for imp in imports(path):
            if imp.startswith("ditrt.") and ORDER.index(layer_of(imp)) > ORDER.index(mine):
                bad.append(f"{mod} ({mine}) imports {imp} ({layer_of(imp)})")
    assert not bad, "\n".join(bad)


def test_every_layer_is_known():
    for path in ROOT.iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            assert layer_of("ditrt." + path.name) in ORDER, path.name
        elif path.suffix == ".py":
            assert layer_of("ditrt." + path.stem) in ORDER, path.name
