"""One way to open any artifact: the backend registry and :func:`open_denoiser`.

Every caller that runs a model (``ditrt sample``, ``ditrt compare``, the pipeline, the benchmarks)
hands an artifact to :func:`open_denoiser` and gets an :class:`OpenDenoiser`: the ``(x, t, y)``
callable, the model config read from the artifact itself, and what the backend allows. The
artifact decides the backend (:func:`artifact_backend`):

- a checkpoint (``"builtin"``, official ``.pt``/``.pth``, ``.safetensors``, diffusers folder) or a
  recipe folder (``recipe.json``): PyTorch (:mod:`ditrt.runtime.torch_backend`);
- an ``.onnx`` graph or a graph manifest ``.groups.json``: ONNX Runtime (:mod:`ditrt.runtime.onnxruntime_backend`);
- a ``.plan``/``.engine`` or an engine manifest: TensorRT (:mod:`ditrt.runtime.tensorrt_backend`).

**The device rule**: every denoiser returns its output on the device of its input ``x`` (copying
inputs to where it computes and the output back when they differ), and says where it computes in
:attr:`OpenDenoiser.device`. Callers sample on ``opened.device``, so that nothing crosses between
host and GPU at each step: the DDPM math of :func:`ditrt.diffusion.sampler.sample` stays on that
device between calls. The torch backend computes on the ``device`` it was opened with, ONNX Runtime
on the CPU (or CUDA with its CUDA provider, onnxruntime-gpu), TensorRT on a CUDA device.

**Batch sizes**: :meth:`OpenDenoiser.images_per_call` (an engine's profile read back through
:func:`ditrt.contracts.profile.images_per_call`) is how many images one sampler call may hold; every
caller that chunks a run (``ditrt sample``, the pipeline) asks it.

A new backend is one module with a factory ``open_<name>(artifact, *, device, **options) -> OpenDenoiser``
and one :data:`BACKENDS` entry. Backend modules are imported only when an artifact of theirs is opened,
so importing this module loads no backend, no model code and no TensorRT.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ditrt.contracts.errors import ConfigError
from ditrt.contracts.groups import is_group_manifest, read_artifact

#: the option names of :func:`open_denoiser` as the CLI spells them, for error messages
_FLAGS = {"model": "--model", "onnx": "--onnx", "config_name": "--config", "num_classes": "--num-classes", "num_heads": "--num-heads"}


@dataclass(frozen=True)
class Backend:
    """A registry entry: ``module.factory(artifact, *, device, **options)`` opens an artifact.

    ``options``: the keywords of :func:`open_denoiser` the backend uses; any other one given is refused."""

    name: str
    module: str
    factory: str
    summary: str
    options: frozenset = frozenset()

    def load(self) -> Callable[..., OpenDenoiser]:
        return getattr(importlib.import_module(self.module), self.factory)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("torch", "ditrt.runtime.torch_backend", "open_torch",
                "PyTorch: a checkpoint (float) or a recipe folder (the simulated quantized model)", frozenset({"model", "config_name", "num_classes", "num_heads"})),
        Backend("onnxruntime", "ditrt.runtime.onnxruntime_backend", "open_onnxruntime",
                "ONNX Runtime: an exported .onnx graph or its .groups.json manifest (CUDA provider on a cuda device)"),
        Backend("tensorrt", "ditrt.runtime.tensorrt_backend", "open_tensorrt",
                "TensorRT: a .plan/.engine or an engine .groups.json manifest (needs TensorRT and a GPU)", frozenset({"onnx"})),
    )
}  # fmt: skip


@dataclass
class OpenDenoiser:
    """What every caller gets from :func:`open_denoiser`.

    ``denoiser(x (B, C, H, W), t (B,), y (B,)) -> (B, out_channels, H, W)`` float32 on ``x``'s device
    (a TensorRT output is a reused buffer: use it before the next call). ``config``: the DiTConfig the
    artifact records. ``max_rows``/``min_rows``: the largest/smallest batch one call takes (an engine's
    profile), None = any. ``model``: the torch module behind a torch backend (None for graphs and
    engines). ``device``: where the backend computes, the device to sample on (see the module doc)."""

    denoiser: Callable
    config: object  # ditrt.contracts.model_config.DiTConfig
    backend: str
    source: str
    precision: str | None = None
    max_rows: int | None = None
    model: object | None = None
    metadata: dict = field(default_factory=dict)
    device: str = "cpu"
    min_rows: int = 1

    def __call__(self, x, t, y):
        """The denoiser itself: with ``config`` this makes an OpenDenoiser a model for samplers and recorders."""
        return self.denoiser(x, t, y)

    @property
    def max_images(self) -> int | None:
        """Images per sampler call with classifier-free guidance (which doubles each batch); None = any."""
        return self.images_per_call(guided=True)

    def images_per_call(self, *, guided: bool) -> int | None:
        """The most images one sampler call may hold (guidance doubles the rows); None = any. A
        :class:`ConfigError` when not even one image fits (see :func:`ditrt.contracts.profile.images_per_call`)."""
        from ditrt.contracts.profile import images_per_call

        return images_per_call(self.max_rows, guided=guided, source=self.source, min_rows=self.min_rows)

    def close(self) -> None:
        close = getattr(self.denoiser, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> OpenDenoiser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_recipe_folder(artifact) -> bool:
    return Path(artifact).is_dir() and (Path(artifact) / "recipe.json").is_file()


def artifact_backend(artifact) -> str:
    """The backend name for ``artifact``: "torch" for a checkpoint or recipe folder, "onnxruntime" for
    a graph or graph manifest, "tensorrt" for an engine or engine manifest (read from its ``kind``)."""
    path = Path(str(artifact))
    if is_group_manifest(path):
        return {"onnx": "onnxruntime", "tensorrt": "tensorrt"}[read_artifact(path)[0]]
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnxruntime"
    if suffix in (".plan", ".engine"):
        return "tensorrt"
    return "torch"


def open_denoiser(artifact, *, model=None, onnx=None, device: str | None = None, config_name: str | None = None,
                  num_classes: int | None = None, num_heads: int | None = None, **backend_options) -> OpenDenoiser:
    """Open ``artifact`` with the backend it calls for (see the module doc).

    ``model``: the float checkpoint (path, "builtin" or a loaded DiT) a recipe folder is checked
    against (optional: a recipe holds its folded float weights). ``onnx``: the graph (or graph
    manifest) an engine was built from, to refuse a stale engine. ``device``: None is the backend's
    default (the CPU; CUDA for TensorRT). ``config_name``, ``num_classes``,
    ``num_heads``: what a checkpoint's shapes cannot say (a named DiTConfig, the class count, the head
    count; see :func:`ditrt.models.checkpoints.load_dit`). An option the artifact's backend would ignore is a
    :class:`ConfigError`. ``backend_options`` go to the backend's factory as they are (ONNX Runtime:
    ``threads``; TensorRT: ``use_cuda_graph``; torch: ``dtype``), for callers that know the backend."""
    backend = BACKENDS[artifact_backend(artifact)]
    given = {"model": model, "onnx": onnx, "config_name": config_name, "num_classes": num_classes, "num_heads": num_heads}
    for name, value in given.items():
        if value is not None and name not in backend.options:
            raise ConfigError(f"{_FLAGS[name]} does not apply to {artifact} ({backend.summary.split(':')[0]}); drop it")
    options = {k: v for k, v in given.items() if k in backend.options}
    if device is not None:
        options["device"] = str(device)
    return backend.load()(artifact, **options, **backend_options)
