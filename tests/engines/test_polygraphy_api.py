"""Every call ditrt makes into Polygraphy's TensorRT loaders fits their signatures (CPU only).

TensorRT cannot run here, so a keyword Polygraphy renamed or dropped would surface only on a GPU
machine, minutes into a build. The calls are read from ditrt's own source with ``ast`` (so a
keyword added later is checked too) and bound against ``inspect.signature`` of Polygraphy's
classes: their ``__init__`` (following ``**kwargs`` up the class hierarchy, as ``CreateConfig``
passes most options to its base), the loader's ``__call__``, and methods of objects ditrt made
(``Profile().add``).

TensorRT 11 removed APIs older Polygraphy releases use unguarded: ``trt.IStreamReader`` (the base of
Polygraphy's ``FileReader``, behind ``EngineFromPath`` until 0.53.4) and ``ILayer.precision_is_set``
(read by ``CreateConfig`` for every layer before 0.50.3). ditrt loads engines from the bytes it
hashed (no stream reader at all) and requires a Polygraphy whose ``CreateConfig`` survives the
missing attribute; the tests below read both code paths.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import polygraphy
import pytest

ROOT = Path(__file__).resolve().parents[2]
#: The modules that compose Polygraphy's TensorRT loaders.
SOURCES = ("ditrt/engines/build.py", "ditrt/runtime/tensorrt_backend.py")
MODULE = "polygraphy.backend.trt"


@dataclass(frozen=True)
class PolygraphyCall:
    where: str  # file:line
    target: str  # e.g. "CreateConfig", "Profile.add", "EngineFromPath()"
    obj: object  # the class, function or method called
    positional: int  # how many positional arguments ditrt passes
    keywords: tuple[str | None, ...]  # None for a **mapping
    instance: bool  # obj is a class being instantiated (bind against __init__ without self)


def polygraphy_calls(source: str, filename: str) -> list[PolygraphyCall]:
    """The calls into :data:`MODULE` in ``source``: names imported from it, attributes of modules
    imported from it, methods of variables assigned from one of its classes, and calls of a loader instance."""
    import importlib

    package = importlib.import_module(MODULE)
    tree = ast.parse(source, filename)
    names: dict[str, object] = {}  # local alias -> Polygraphy object
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == MODULE:
            for a in node.names:
                names[a.asname or a.name] = getattr(package, a.name)
    instances: dict[str, type] = {}  # variable -> the Polygraphy class it was made from
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name):
            cls = names.get(node.value.func.id)
            if inspect.isclass(cls):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        instances[t.id] = cls
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f, target, obj, instance = node.func, None, None, False
        if isinstance(f, ast.Name) and f.id in names:
            target, obj, instance = f.id, names[f.id], inspect.isclass(names[f.id])
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            owner = names.get(f.value.id) if inspect.ismodule(names.get(f.value.id)) else instances.get(f.value.id)
            if owner is not None:
                target = f"{getattr(owner, '__name__', f.value.id)}.{f.attr}"
                obj = getattr(owner, f.attr, None)
                assert obj is not None, f"{filename}:{node.lineno}: polygraphy {target} does not exist in Polygraphy {polygraphy.__version__}"
        elif isinstance(f, ast.Call) and isinstance(f.func, ast.Name) and inspect.isclass(names.get(f.func.id)):
            target, obj = f"{f.func.id}()", names[f.func.id].__call__  # calling the loader runs it
        if obj is not None:
            keywords = tuple(k.arg for k in node.keywords)
            calls.append(PolygraphyCall(f"{filename}:{node.lineno}", target, obj, len(node.args), keywords, instance))
    return calls


def accepted(call: PolygraphyCall) -> tuple[set[str], int | None]:
    """(keyword names the callable accepts, the most positional arguments it takes or None for *args).

    A class's ``__init__`` that takes ``**kwargs`` hands them to its base class (Polygraphy's
    pattern): the bases' parameters are accepted too. A ``**kwargs`` that ends nowhere is not taken
    as "accepts anything": such a keyword stays unverified and fails the test."""
    funcs = [c.__init__ for c in call.obj.__mro__ if "__init__" in vars(c) and c is not object] if call.instance else [call.obj]
    names, max_positional = set(), None
    for i, fn in enumerate(funcs):
        params = list(inspect.signature(fn).parameters.values())
        if params and params[0].name == "self":
            params = params[1:]
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if i == 0:
            positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            max_positional = None if any(p.kind == p.VAR_POSITIONAL for p in params) else len(positional)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names, max_positional


def problems(calls: list[PolygraphyCall]) -> list[str]:
    """One line per argument a call passes that its Polygraphy signature does not take."""
    found = []
    for call in calls:
        names, max_positional = accepted(call)
        for k in call.keywords:
            if k is None:
                found.append(f"{call.where}: {call.target}(**...) cannot be checked; pass the keywords explicitly")
            elif k not in names:
                found.append(f"{call.where}: {call.target} has no parameter {k!r} in Polygraphy {polygraphy.__version__}")
        if max_positional is not None and call.positional > max_positional:
            found.append(f"{call.where}: {call.target} takes {max_positional} positional arguments, ditrt passes {call.positional}")
    return found


def ditrt_calls() -> list[PolygraphyCall]:
    return [c for rel in SOURCES for c in polygraphy_calls((ROOT / rel).read_text(), rel)]


def test_polygraphy_tensorrt_loaders_import_without_tensorrt():
    """What makes this a CPU test: with TensorRT made unimportable, the loaders and their signatures are still there."""
    import subprocess

    code = (
        "import sys, inspect; sys.modules['tensorrt'] = None\n"  # `import tensorrt` now raises ImportError
        "import polygraphy.backend.trt as t\n"
        "for n in ('NetworkFromOnnxPath', 'CreateConfig', 'EngineBytesFromNetwork', 'Profile'):\n"
        "    inspect.signature(getattr(t, n).__init__)\n"
        "print(len(inspect.signature(t.CreateConfig.__mro__[1].__init__).parameters))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 10  # CreateConfig's base holds the many builder options


def test_every_keyword_ditrt_passes_to_polygraphy_is_in_its_signature():
    calls = ditrt_calls()
    assert problems(calls) == []
    # the collector really sees ditrt's calls (a test that found none would pass vacuously)
    seen = {(c.target, k) for c in calls for k in c.keywords}
    expected = {
        ("NetworkFromOnnxPath", "strongly_typed"),
        ("CreateConfig", "profiles"), ("CreateConfig", "builder_optimization_level"),
        ("CreateConfig", "load_timing_cache"), ("CreateConfig", "memory_pool_limits"),
        ("EngineBytesFromNetwork", "config"), ("EngineBytesFromNetwork", "save_timing_cache"),
        ("Profile.add", "min"), ("Profile.add", "opt"), ("Profile.add", "max"),
    }  # fmt: skip
    assert expected <= seen, expected - seen
    assert {"EngineBytesFromNetwork()"} <= {c.target for c in calls}  # the loader is run, with no arguments


def test_a_renamed_or_unknown_keyword_is_reported():
    """The check can fail: keywords Polygraphy does not take, too many positionals, an unverifiable **mapping."""
    source = textwrap.dedent(
        """
        from polygraphy.backend.trt import CreateConfig, EngineFromPath, Profile

        def build(shapes, opts):
            profile = Profile()
            profile.add("x", min=(1,), opt=(2,), maximum=(4,))
            config = CreateConfig(profiles=[profile], builder_optimisation_level=3)
            CreateConfig(**opts)
            return EngineFromPath("e.plan", None, None, "extra")()
        """
    )
    found = problems(polygraphy_calls(source, "fake.py"))
    assert len(found) == 4, found
    assert "fake.py:6: Profile.add has no parameter 'maximum'" in found[0]
    assert "fake.py:7: CreateConfig has no parameter 'builder_optimisation_level'" in found[1]
    assert "fake.py:8: CreateConfig(**...) cannot be checked" in found[2]
    assert "fake.py:9: EngineFromPath takes 3 positional arguments, ditrt passes 4" in found[3]


def test_a_keyword_swallowed_by_kwargs_at_the_top_is_not_taken_on_trust():
    """CreateConfig(**kwargs) forwards to its base: a keyword neither has is still reported."""
    from polygraphy.backend.trt import CreateConfig

    sig = inspect.signature(CreateConfig.__init__)
    assert any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())  # why the hierarchy is followed
    names, _ = accepted(PolygraphyCall("x", "CreateConfig", CreateConfig, 0, (), True))
    assert {"fp16", "profiles", "builder_optimization_level", "memory_pool_limits"} <= names
    assert "no_such_option" not in names


@pytest.mark.parametrize("rel", SOURCES)
def test_each_source_calls_polygraphy(rel):
    assert polygraphy_calls((ROOT / rel).read_text(), rel), f"{rel} no longer calls Polygraphy: update SOURCES"


#: the stream-reader load path: trt.IStreamReader (removed in TensorRT 11), Polygraphy's FileReader on it, EngineFromPath using that
STREAM_READER_PATH = ("IStreamReader", "FileReader", "EngineFromPath")


def _names(tree) -> set[str]:
    """Every identifier a module uses: names, attributes and imported names."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {a.name.split(".")[-1] for a in node.names}
    return out


def test_engine_loading_reads_the_hashed_bytes_and_no_stream_reader():
    """The runtime's load path, read from its source: the bytes read_engine checked against the sidecar
    go straight to Runtime.deserialize_cuda_engine; no stream reader (trt.IStreamReader is gone in
    TensorRT 11, and Polygraphy's FileReader subclassed it before 0.53.4) is named anywhere in the
    runtime or engine code, nor in the Polygraphy functions the runtime calls."""
    for path in sorted((ROOT / "ditrt" / "runtime").glob("*.py")) + [ROOT / "ditrt" / "engines" / "build.py"]:
        used = _names(ast.parse(path.read_text()))
        assert not used & {*STREAM_READER_PATH, "IStreamReaderV2"}, path
    source = (ROOT / "ditrt/runtime/tensorrt_backend.py").read_text()
    tree = ast.parse(source)
    methods = {f.name: f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    init, load = methods["__init__"], methods["_deserialize"]
    reads = [n for n in ast.walk(init) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
             and getattr(n.value.func, "id", None) == "read_engine"]  # fmt: skip
    assert len(reads) == 1
    data = reads[0].targets[0].id
    handed = [n for n in ast.walk(init) if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "_deserialize"]
    assert [[a.id for a in c.args] for c in handed] == [[data]]
    deserialize = [n for n in ast.walk(load) if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "deserialize_cuda_engine"]
    assert len(deserialize) == 1 and [a.id for a in deserialize[0].args] == [load.args.args[1].arg]  # the bytes, not a reader
    for call in polygraphy_calls(source, "ditrt/runtime/tensorrt_backend.py"):
        assert not any(name in inspect.getsource(call.obj) for name in STREAM_READER_PATH), call.target


def unguarded(source: str, attr: str) -> list[int]:
    """Lines of ``source`` that read ``.attr`` outside a ``try`` that catches AttributeError."""
    tree = ast.parse(source)
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            catches = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
            if any("AttributeError" in c for c in catches):
                guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == attr and id(n) not in guarded]


def test_the_installed_polygraphy_builds_on_tensorrt_11():
    """CreateConfig reads ILayer.precision_is_set, which TensorRT 11 removed: only inside a try that
    catches AttributeError (Polygraphy 0.50.3 and later; 0.49.x fails every TensorRT 11 build)."""
    from polygraphy.backend.trt import CreateConfig

    assert unguarded(inspect.getsource(inspect.getmodule(CreateConfig)), "precision_is_set") == []
    old = "def call_impl(network):\n    return {l.name for l in network if l.precision_is_set}\n"
    assert unguarded(old, "precision_is_set") == [2]  # the check can fail: Polygraphy 0.49's unguarded read


def test_setup_cfg_requires_a_polygraphy_that_builds_on_tensorrt_11():
    from packaging.requirements import Requirement
    from packaging.version import Version

    lines = [ln.strip() for ln in (ROOT / "setup.cfg").read_text().splitlines() if ln.strip().startswith("polygraphy")]
    assert len(lines) == 1
    spec = Requirement(lines[0]).specifier
    assert Version("0.49.26") not in spec and Version("0.50.3") in spec  # see test_the_installed_polygraphy_builds_on_tensorrt_11
    assert Version(polygraphy.__version__) in spec
