"""ditrt/engines sits below the runtime and the CLI, and nothing imports TensorRT at import time."""

import ast
import subprocess
import sys
from pathlib import Path

import ditrt

PACKAGE = Path(ditrt.__file__).parent
ALLOWED = ("ditrt.errors", "ditrt.models", "ditrt.diffusion", "ditrt.recipe", "ditrt.export", "ditrt.engines", "ditrt")


def _ditrt_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n for n in names if n == "ditrt" or n.startswith("ditrt.")}


def test_engines_import_only_lower_layers():
    for path in sorted((PACKAGE / "engines").glob("*.py")):
        for name in _ditrt_imports(path):
            assert name == "ditrt" or name.startswith(ALLOWED[:-1]), f"{path.name} imports {name}"
            assert not name.startswith(("ditrt.runtime", "ditrt.cli")), f"{path.name} imports {name}"


def test_importing_the_tensorrt_layer_does_not_import_tensorrt():
    code = (
        "import sys, ditrt.engines, ditrt.engines.build, ditrt.runtime.tensorrt_backend, ditrt.cli.build_cmd\n"
        "bad = [m for m in ('tensorrt', 'polygraphy.backend.trt') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
