"""The ONNX Runtime denoiser: any graph from :func:`ditrt.export.export_onnx` behind the sampler's
``(x, t, y) -> output`` call, on the CPU (or CUDA with onnxruntime-gpu).

Session settings that keep quantized graphs on real integer kernels, with exact results:
- ``MatMulAddFusion`` is disabled: it turns a Linear's ``MatMul + Add`` into a float Gemm before the
  Q/DQ fusions run, losing the int8 kernel. Still needed with 1.32 (measured, issue 15): it leaves the
  3-D token Linears of ditrt's graphs alone (their batch is dynamic and it rewrites 3-D MatMuls only
  at known shapes, where at opset 21 it makes session creation fail, onnxruntime#25526), but it takes
  the 2-D ones (adaLN and timestep MLP, quantized by ``--quantize-all`` recipes) off the int8 kernel.
  Then ``Q -> DQ -> MatMul`` with an int8 DQ weight fuses to ``MatMulIntegerToFloat`` and a block-wise
  INT4 DQ weight to ``MatMulNBits``.
- ``SkipLayerNormFusion`` is disabled: it fuses the last residual ``Add`` with the final LayerNorm
  into one ``SkipLayerNormalization``, whose CPU kernel took 4.3 ms where the ``Add`` and the
  ``LayerNormalization`` it replaces take 0.7 ms together (64 x 64 x 192, one thread; issue 15); unfused,
  ONNX Runtime also computes what the graph and the torch simulation say (the fused kernel rounds
  differently, 1e-6).
- ``session.qdq_matmulnbits_accuracy_level = 0``: ``MatMulNBits`` would otherwise quantize its float
  activations to int8 on the fly (about 2% error); 0 keeps them float, as the graph says.

On the CPU, a graph with 8-bit activations runs with its Linear biases folded into the int8 kernels
after ONNX Runtime's own optimizations, which leave them as separate Adds (why, and what it gains:
:mod:`ditrt.runtime.onnxruntime_rewrites`). The exported graph itself is unchanged.

Threads: ``threads`` sets ONNX Runtime's intra-op pool (None: its default, one thread per core).
Measured on the idle 2-core machine (``bench/results/ort_profile/builtin-b32-t1.md``, session
options): 2 threads run a 64-row step of the built-in model 1.7-1.9x faster than 1 (fp32 318 -> 167
ms, W8A8 144 -> 86 ms); with other jobs on the cores a second thread only waits for a busy core and
was slower than one (fp32 479 vs 361 ms). Pass 1 on a shared machine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from ditrt.contracts.errors import ArtifactError, ConfigError, InputError, MissingDependencyError
from ditrt.contracts.spec import INPUT_NAMES, OUTPUT_NAMES

log = logging.getLogger(__name__)

DISABLED_OPTIMIZERS = ("MatMulAddFusion", "SkipLayerNormFusion")
SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}
_PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def device_providers(device: str) -> list | None:
    """The providers a session on ``device`` asks for: None (the CPU) for ``cpu``, the CUDA provider on
    that GPU for ``cuda`` (GPU 0) or ``cuda:N``, so that each torchrun rank runs on its own GPU."""
    kind, sep, index = str(device).partition(":")
    if kind != "cuda":
        return None
    if sep and not index.isdigit():
        raise ConfigError(f"device {device!r} is not cuda or cuda:N; pass e.g. --device cuda:0")
    return [("CUDAExecutionProvider", {"device_id": int(index or 0)})]


def onnxruntime_device(device: str) -> str:
    """Where ONNX Runtime computes when asked for torch ``device``: that GPU with the CUDA provider
    (onnxruntime-gpu installed), else the CPU. Callers that fall back say so once."""
    if not str(device).startswith("cuda"):
        return "cpu"
    import onnxruntime as ort

    return str(device) if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def resolve_providers(providers=None) -> list:
    """None -> CPU. Accepts "cpu"/"cuda", ONNX Runtime provider names or ``(name, options)`` pairs (as
    :func:`device_providers` makes); refuses ones not installed. Pairs are kept as they are."""
    import onnxruntime as ort

    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, (str, tuple)):
        providers = [providers]
    chosen = [(_provider_name(p[0]), p[1]) if isinstance(p, tuple) else _provider_name(p) for p in providers]
    names = [p[0] if isinstance(p, tuple) else p for p in chosen]
    available = ort.get_available_providers()
    for name in names:
        if name not in available:
            hint = (
                "install onnxruntime-gpu (pip install -e '.[gpu]') in place of onnxruntime"
                if name == "CUDAExecutionProvider"
                else ""
            )
            raise MissingDependencyError(
                f"ONNX Runtime provider {name} is not available here (available: {', '.join(available)}); {hint or 'pick one of those'}"
            )
    if "CPUExecutionProvider" not in names:
        chosen.append("CPUExecutionProvider")  # fallback for ops the accelerator lacks
    return chosen


def _provider_name(name: str) -> str:
    return _PROVIDER_NAMES.get(name.lower(), name)


def make_session(path, *, providers=None, threads: int | None = None, optimized_model_path=None, profile_prefix=None,
                 disabled_optimizers=DISABLED_OPTIMIZERS, fold_bias: bool = True):  # fmt: skip
    """An ``onnxruntime.InferenceSession`` with the settings above. ``threads`` (None: ONNX Runtime's
    default) sets the intra-op thread count; ``optimized_model_path`` saves the graph as ONNX Runtime
    runs it (to see which fused kernels it runs); ``profile_prefix`` turns on ONNX Runtime's
    profiler, whose JSON trace ``session.end_profiling()`` writes (``bench/ort_profile.py``);
    ``disabled_optimizers``: the graph rewrites switched off (the benchmarks measure other choices);
    ``fold_bias``: on the CPU, a graph with integer activations runs with its Linear biases folded
    into the int8 kernels (:mod:`ditrt.runtime.onnxruntime_rewrites`)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX file {path} not found; create it with `ditrt export`")
    chosen = resolve_providers(providers)
    cpu_only = all((p[0] if isinstance(p, tuple) else p) == "CPUExecutionProvider" for p in chosen)
    unfolded = None  # why a graph that could be folded was not
    if fold_bias and cpu_only and _has_integer_activations(path):
        try:
            folded = _folded_bias_session(path, chosen, threads, optimized_model_path, profile_prefix, disabled_optimizers)
            if folded is not None:
                return folded
        except Exception as e:  # noqa: BLE001  no scratch space, or a graph ONNX Runtime refuses (then said once, below)
            unfolded = _first_line(e)
    try:
        so = _options(threads, optimized_model_path, profile_prefix)
        session = ort.InferenceSession(os.fspath(path), so, providers=chosen, disabled_optimizers=list(disabled_optimizers))
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/InvalidProtobuf types
        raise ArtifactError(f"ONNX Runtime cannot load {path} ({_first_line(e)}); re-export it with `ditrt export`") from None
    if unfolded is not None:  # the same outputs, without the bias fold's speed
        log.warning("%s runs without its biases folded into the int8 kernels (%s)", path.name, unfolded)
    return session


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def _options(threads, optimized_model_path=None, profile_prefix=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    for key, value in SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    return so


def _has_integer_activations(path: Path) -> bool:
    """Whether the graph quantizes activations to 8-bit integers (a QuantizeLinear with an int8 or
    uint8 zero point): the graphs whose Linears ONNX Runtime runs as ``MatMulIntegerToFloat``."""
    import onnx

    try:
        graph = onnx.load(os.fspath(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001  an unreadable file is ONNX Runtime's to refuse, with its message
        return False
    eight_bit = {t.name for t in graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    return any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in eight_bit for n in graph.node)


def _folded_bias_session(path: Path, providers, threads, optimized_model_path, profile_prefix, disabled_optimizers):
    """ONNX Runtime optimizes the graph once (saved to a scratch folder, its weights beside it), the
    biases are folded into its int8 kernels, and that graph runs with no further optimization; None
    where there was no bias to fold."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from ditrt.runtime.onnxruntime_rewrites import fold_integer_gemm_bias

    with tempfile.TemporaryDirectory(prefix="ditrt-ort-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        so = _options(threads, optimized)
        so.log_severity_level = 3  # its notes on saving an optimized graph are not the user's concern
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(os.fspath(path), so, providers=providers, disabled_optimizers=list(disabled_optimizers))  # writes it
        model = onnx.load(os.fspath(optimized), load_external_data=False)
        if fold_integer_gemm_bias(model.graph) == 0:
            return None
        folded = Path(tmp) / "folded.onnx"
        onnx.save(model, os.fspath(folded))
        so = _options(threads, optimized_model_path, profile_prefix)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimized, then folded
        if optimized_model_path is not None:  # its weights come from the scratch folder: saved beside it
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{Path(optimized_model_path).name}.data")
        return ort.InferenceSession(os.fspath(folded), so, providers=providers)


class OnnxRuntimeDenoiser:
    """``(x, t, y) -> output``: x (B, C, H, W), t (B,) float timesteps, y (B,) int64 labels, on any
    device; returns a new float32 torch tensor (B, C_out, H, W) on ``x``'s device (the session runs on
    host numpy arrays, so CUDA inputs are copied over and back)."""

    def __init__(self, path, *, providers=None, threads: int | None = None):
        self.path = Path(path)
        self.session = make_session(self.path, providers=providers, threads=threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if set(inputs) != set(INPUT_NAMES) or outputs != list(OUTPUT_NAMES):
            raise ArtifactError(
                f"{self.path} has inputs {sorted(inputs)} and outputs {outputs}, not x, t, y -> out; export it with `ditrt export`"
            )
        self.input_shapes = {n: tuple(i.shape) for n, i in inputs.items()}
        self.input_dtypes = {n: _NUMPY.get(i.type) for n, i in inputs.items()}
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _feed(self, name: str, value) -> np.ndarray:
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        want = self.input_shapes[name]
        if arr.ndim != len(want) or any(isinstance(w, int) and w != a for w, a in zip(want, arr.shape)):
            shown = tuple(w if isinstance(w, int) else "batch" for w in want)
            raise InputError(f"input {name} has shape {tuple(arr.shape)} but {self.path.name} expects {shown}")
        dtype = self.input_dtypes[name]
        if name == "y" and not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"class labels y must be integers, got {arr.dtype}")
        return np.ascontiguousarray(arr.astype(dtype, copy=False))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feeds = {"x": self._feed("x", x), "t": self._feed("t", t), "y": self._feed("y", y)}
        batches = {k: v.shape[0] for k, v in feeds.items()}
        if len(set(batches.values())) != 1:
            raise InputError(f"x, t and y must share one batch size, got {batches}")
        out = self.session.run(list(OUTPUT_NAMES), feeds)[0]
        device = x.device if isinstance(x, torch.Tensor) else "cpu"
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(device)


def graph_config(metadata: dict, path):
    """The DiTConfig an exported graph records in its metadata."""
    from ditrt.contracts.model_config import config_from_metadata

    return config_from_metadata(metadata, path, "re-export it with `ditrt export`")


def open_onnxruntime(artifact, *, device: str = "cpu", threads: int | None = None):
    """:class:`~ditrt.runtime.open.OpenDenoiser` for a graph or graph manifest (one session per graph;
    the CUDA provider on the GPU of a cuda device, :func:`device_providers`). Every graph of a
    manifest must record the same model."""
    from ditrt.contracts.groups import read_artifact
    from ditrt.runtime.groups import TimestepGroupDenoiser
    from ditrt.runtime.open import OpenDenoiser

    kind, edges, files = read_artifact(artifact)
    if kind != "onnx":
        raise ArtifactError(f"{artifact} lists TensorRT engines, not ONNX graphs; sample it with the TensorRT backend")
    providers = device_providers(device)
    sessions = [OnnxRuntimeDenoiser(f, providers=providers, threads=threads) for f in files]
    configs = [graph_config(s.metadata, s.path) for s in sessions]
    if any(c != configs[0] for c in configs):
        raise ArtifactError(f"the graphs of {artifact} record different model configs; re-export them together with `ditrt export`")
    batch = sessions[0].input_shapes["x"][0]
    meta = sessions[0].metadata
    computes = f"cuda:{providers[0][1]['device_id']}" if providers and "CUDAExecutionProvider" in sessions[0].providers else "cpu"
    return OpenDenoiser(TimestepGroupDenoiser(sessions, edges), configs[0], "onnxruntime", str(artifact), meta.get("ditrt.precision"),
                        max_rows=batch if isinstance(batch, int) else None, metadata=meta, device=computes)  # fmt: skip
