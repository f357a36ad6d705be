"""The TensorRT denoiser: a ditrt engine behind the same ``(x, t, y) -> output`` call as the torch
and ONNX Runtime denoisers, so the sampler loop (DDPM math in torch, on the GPU) is unchanged.

The pattern of NVIDIA's demo Diffusion runner, minus its race: every input and output is a
torch CUDA tensor allocated once for the profile's largest batch and bound once with
``set_tensor_address``. A call copies its inputs into those buffers on the caller's (torch's
current) stream, and the engine runs on a **dedicated stream** of its own that is ordered with the
caller's both ways (``wait_stream``): it starts after the copies and after the caller's last use of
the previous output, and the caller's next kernels wait for it. TensorRT adds a device-wide
synchronisation to every ``execute_async_v3`` on the legacy default stream (torch's default), which
a dedicated stream avoids. Optionally one CUDA graph per batch size replays the engine launch,
captured on that same stream as TensorRT documents it: one ``execute_async_v3`` after the shape
change (TensorRT's deferred, shape-dependent set-up must not land in the graph), a stream
synchronisation, then the captured launch. A capture CUDA refuses falls back to eager launches
with one warning, as NVIDIA's samples (trtexec) do.

The engine file is read once: those bytes are checked against the sidecar's hash and deserialized
with ``trt.Runtime.deserialize_cuda_engine`` (no Polygraphy ``FileReader``, whose TensorRT stream
reader class changed in TensorRT 11).

TensorRT 10.12+ / 11.x name-based I/O API only (``num_io_tensors``, ``get_tensor_name``,
``get_tensor_mode``, ``get_tensor_dtype``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ditrt.contracts.errors import ArtifactError, ConfigError, InputError
from ditrt.contracts.profile import rows_per_image
from ditrt.contracts.sidecar import load_sidecar, read_engine, verify_sidecar
from ditrt.engines.build import gpu_identity, import_tensorrt, require_cuda_gpu

log = logging.getLogger(__name__)

#: tensorrt dtype attribute -> torch dtype (looked up with getattr: not every version has every type)
_TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
    "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}  # fmt: skip
INPUTS = ("x", "t", "y")


def _torch_dtype(trt, trt_dtype) -> torch.dtype:
    for name, dtype in _TORCH_DTYPES.items():
        if getattr(trt, name, None) == trt_dtype:
            return dtype
    raise ArtifactError(
        f"the engine has an I/O tensor of type {trt_dtype}, which ditrt cannot bind; re-export the model with `ditrt export`"
    )


def _cuda_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        raise ConfigError(f"TensorRT engines run on a CUDA device, not {device}; use --device cuda")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


class TensorRTDenoiser:
    """``(x, t, y) -> (B, 2C, H, W)`` float32 on ``x``'s device, computed by the engine at ``engine_path``
    on ``device`` (inputs on another device are copied over, and the output back).

    Before deserializing, the sidecar is checked against the running TensorRT version, this GPU
    and the engine's bytes (and against ``onnx_path``, when given, to refuse a stale engine).

    **On the engine's device the returned tensor is a view of a buffer that the next call
    overwrites**: use it (or ``.clone()`` it) before calling again. Torch code that reads it on the
    stream that was current during the call needs no synchronisation (see the module doc).

    ``use_cuda_graph=True`` captures one CUDA graph per batch size on first use and replays it
    afterwards. Each captured batch size gets its own execution context, as TensorRT recommends (a
    graph bakes in the context's shapes and memory), which costs one context's activation memory
    per batch size seen. If CUDA refuses a capture, the denoiser says so once and runs eagerly.
    """

    def __init__(self, engine_path: Path, *, device: str = "cuda", use_cuda_graph: bool = False, onnx_path: Path | None = None):
        self.engine_path = Path(engine_path)
        self.use_cuda_graph = bool(use_cuda_graph)
        trt = import_tensorrt(builder=False)
        require_cuda_gpu()
        self.device = _cuda_device(device)
        gpu_name, capability = gpu_identity(self.device.index)
        self.sidecar = load_sidecar(self.engine_path)
        verify_sidecar(self.sidecar, trt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability, onnx_path=onnx_path)
        data = read_engine(self.sidecar, self.engine_path)  # the bytes that are hashed are the bytes deserialized
        self._trt = trt
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_contexts: dict[int, object] = {}
        with torch.cuda.device(self.device):
            self._runtime, self.engine = self._deserialize(data)
            del data
            self._read_io()
            self._context = self._new_context()  # eager context; in graph mode lent to the first captured batch
            self._allocate()
            self._stream = torch.cuda.Stream(self.device)  # the engine's own stream: never the legacy default stream

    # ------------------------------------------------------------------------------ setup
    def _deserialize(self, data: bytes):
        from polygraphy.backend.trt import util as trt_util

        trt, logger = self._trt, trt_util.get_trt_logger()  # TensorRT's log through Polygraphy's logger
        init_plugins = getattr(trt, "init_libnvinfer_plugins", None)
        if init_plugins is not None:
            init_plugins(logger, "")  # engines that use TensorRT's standard plugins find them registered
        runtime = trt.Runtime(logger)  # kept alive as long as the engine
        engine = runtime.deserialize_cuda_engine(data)  # from host memory: documented in TensorRT 10 and 11
        if engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {self.engine_path} (see the TensorRT log): {self.sidecar.rebuild_hint(self.engine_path)}")
        return runtime, engine

    def _read_io(self) -> None:
        trt, engine = self._trt, self.engine
        self._dtypes: dict[str, torch.dtype] = {}
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            self._dtypes[name] = _torch_dtype(trt, engine.get_tensor_dtype(name))
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
        if sorted(inputs) != sorted(INPUTS) or len(outputs) != 1:
            raise ArtifactError(
                f"engine {self.engine_path} has inputs {inputs} and outputs {outputs}; ditrt engines take x, t, y and "
                "return one output: build it from a graph made by `ditrt export`"
            )
        self.output_name = outputs[0]
        # (min, opt, max) shapes of profile 0, the only profile ditrt builds
        self._profile = {n: [tuple(s) for s in engine.get_tensor_profile_shape(n, 0)] for n in INPUTS}
        self.min_batch, self.max_batch = self._profile["x"][0][0], self._profile["x"][2][0]

    def _new_context(self):
        context = self.engine.create_execution_context()
        if context is None:
            raise ArtifactError(f"TensorRT could not create an execution context for {self.engine_path} (out of GPU memory?)")
        return context

    def _allocate(self) -> None:
        """One buffer per I/O tensor, sized for the profile's max batch; bound to the eager context."""
        self._buffers: dict[str, torch.Tensor] = {}
        for name in INPUTS:
            self._buffers[name] = torch.zeros(self._profile[name][2], dtype=self._dtypes[name], device=self.device)
        self._set_batch(self._context, self.max_batch)  # the output shape at max batch sizes its buffer
        out_shape = tuple(self._context.get_tensor_shape(self.output_name))
        if any(d < 0 for d in out_shape):
            raise ArtifactError(
                f"engine {self.engine_path} has a data-dependent output shape {out_shape}; ditrt engines have static outputs"
            )
        self._buffers[self.output_name] = torch.empty(out_shape, dtype=self._dtypes[self.output_name], device=self.device)
        self._context_batch = self.max_batch
        self._bind(self._context)

    def _bind(self, context) -> None:
        for name, buf in self._buffers.items():
            if not context.set_tensor_address(name, buf.data_ptr()):
                raise RuntimeError(f"TensorRT refused the address of buffer {name!r}")  # an internal bug, not a user error

    def _set_batch(self, context, batch: int) -> None:
        for name in INPUTS:
            shape = (batch, *self._profile[name][2][1:])
            if not context.set_input_shape(name, shape):
                raise InputError(f"the engine refused input {name!r} of shape {shape}; its profile is {self._profile[name]}")

    # ------------------------------------------------------------------------------ running
    def _enqueue(self, context) -> None:
        """One engine launch on the engine's stream."""
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.engine_path}; see the TensorRT log")

    def _eager_context(self):
        if self._context is None:  # lent to a captured graph
            self._context = self._new_context()
            self._bind(self._context)
            self._context_batch = None
        return self._context

    def _run_eager(self, batch: int) -> None:
        context = self._eager_context()
        if self._context_batch != batch:
            self._set_batch(context, batch)
            self._context_batch = batch
        self._enqueue(context)

    def _capture(self, batch: int) -> torch.cuda.CUDAGraph | None:
        """A CUDA graph of one launch at ``batch`` rows, or None (with one warning) if CUDA refuses the
        capture; called with the engine's stream current (see :meth:`_launch`)."""
        if self._context is not None:
            context, self._context = self._context, None
        else:
            context = self._new_context()
            self._bind(context)
        self._set_batch(context, batch)
        self._enqueue(context)  # warm-up: TensorRT's deferred set-up after a shape change must not be captured
        self._stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._stream):
                self._enqueue(context)
        except RuntimeError as e:  # the stream capture was invalidated, or TensorRT refused to launch under capture
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.warning("CUDA graph capture failed for %s (%s): running it without CUDA graphs", self.engine_path.name, reason[:200])
            self.use_cuda_graph = False
            self._context, self._context_batch = context, batch  # the eager path takes the warmed-up context
            return None
        self._graphs[batch], self._graph_contexts[batch] = graph, context
        log.debug("captured a CUDA graph for batch %d", batch)
        return graph

    def _launch(self, batch: int) -> None:
        """Run the engine on its stream, which must be current: a graph replay or an eager launch."""
        if self.use_cuda_graph:
            graph = self._graphs.get(batch)
            if graph is None:
                graph = self._capture(batch)
            if graph is not None:
                graph.replay()  # onto the current stream, the engine's
                return
        self._run_eager(batch)

    def _check(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> int:
        want = tuple(self._buffers["x"].shape[1:])
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise InputError(f"x must be (B, {', '.join(map(str, want))}) for engine {self.engine_path}, got {tuple(x.shape)}")
        b = int(x.shape[0])
        if tuple(t.shape) != (b,) or tuple(y.shape) != (b,):
            raise InputError(f"t and y must be ({b},) to match x, got {tuple(t.shape)} and {tuple(y.shape)}")
        if not self.min_batch <= b <= self.max_batch:
            raise InputError(
                f"a batch of {b} rows is outside engine {self.engine_path}'s profile [{self.min_batch}, {self.max_batch}] "
                f"({self.max_batch // rows_per_image(True)} images per call with guidance): sample with a --batch-size it takes "
                "or rebuild with `ditrt build --batch`"
            )
        return b

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B,), (B,) -> (B, 2C, H, W) float32 on ``x``'s device (see the class doc)."""
        b = self._check(x, t, y)
        with torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            # copy_ casts (x/t to the engine's float type, y to its integer type, int64 or int32), on the caller's stream
            self._buffers["x"][:b].copy_(x)
            self._buffers["t"][:b].copy_(t)
            self._buffers["y"][:b].copy_(y)
            self._stream.wait_stream(caller)  # after the copies and the caller's reads of the previous output
            # The outer stream context restores the caller's stream on exit, also when a failed capture
            # leaves torch.cuda.graph's own stream context unexited.
            with torch.cuda.stream(self._stream):
                self._launch(b)
            caller.wait_stream(self._stream)  # the caller's next kernels (reading the output) wait for the engine
            out = self._buffers[self.output_name][:b]  # leading-axis slice: contiguous, same address as bound
            out = out if out.dtype == torch.float32 else out.float()
        return out if x.device == out.device else out.to(x.device)

    # ------------------------------------------------------------------------------ lifetime
    @property
    def precision(self) -> str | None:
        return self.sidecar.precision

    def close(self) -> None:
        """Release graphs, contexts, the engine and the buffers (in that order)."""
        self._graphs.clear()
        self._graph_contexts.clear()
        self._context = None
        self.engine = None
        self._runtime = None
        self._buffers = {}
        self._stream = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def engine_config(sidecar, engine_path):
    """The DiTConfig of the graph an engine was built from (its sidecar keeps the graph's metadata)."""
    from ditrt.contracts.model_config import config_from_metadata

    return config_from_metadata(sidecar.onnx_metadata, f"engine {engine_path}",
                                "rebuild it with `ditrt build` from a graph made by `ditrt export`")  # fmt: skip


def open_tensorrt(artifact, *, device: str = "cuda", onnx=None, use_cuda_graph: bool = False):
    """:class:`~ditrt.runtime.open.OpenDenoiser` for an engine or engine manifest; with ``onnx`` (a
    graph or graph manifest) each engine is checked against the graph it was built from."""
    from ditrt.contracts.groups import read_artifact
    from ditrt.runtime.groups import TimestepGroupDenoiser
    from ditrt.runtime.open import OpenDenoiser

    kind, edges, engines = read_artifact(artifact)
    if kind != "tensorrt":
        raise ArtifactError(f"{artifact} lists ONNX graphs, not TensorRT engines; build engines with `ditrt build --onnx {artifact}`")
    graphs = [None] * len(engines)
    if onnx is not None:
        onnx_kind, _, graphs = read_artifact(onnx)
        if onnx_kind != "onnx":
            raise ConfigError(f"--onnx {onnx} lists TensorRT engines; pass the graph (or graph manifest) the engine was built from")
        if len(graphs) != len(engines):
            raise ConfigError(f"{onnx} and {artifact} list different numbers of timestep groups; rebuild with `ditrt build`")
    runners = []
    try:
        for e, g in zip(engines, graphs):
            runners.append(TensorRTDenoiser(e, device=device, onnx_path=g, use_cuda_graph=use_cuda_graph))
        configs = [engine_config(r.sidecar, r.engine_path) for r in runners]
        if any(c != configs[0] for c in configs):
            raise ArtifactError(f"the engines of {artifact} record different model configs; rebuild them with `ditrt build`")
    except BaseException:
        for r in runners:
            r.close()
        raise
    first = runners[0]
    return OpenDenoiser(TimestepGroupDenoiser(runners, edges), configs[0], "tensorrt", str(artifact), first.precision,
                        max_rows=min(r.max_batch for r in runners), min_rows=max(r.min_batch for r in runners),
                        metadata=dict(first.sidecar.onnx_metadata), device=str(first.device))  # fmt: skip
