"""Speed of a quantized artifact against its float model, measured side by side in one run on the same
backend and device: the one like-for-like speed figure of the pipeline's report (:func:`speed_comparison`,
:func:`time_side_by_side`, :func:`speed_line`)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

SPEED_WARMUP = 1  # untimed passes over the comparison inputs before the float vs quantized timing
SPEED_REPEATS = 3  # timed passes; the report gives the median (and the range) of their ms per call


def speed_comparison(float_artifact, opened, feeds: list, *, onnx=None, out_dir: Path | None = None,
                     warmup: int = SPEED_WARMUP, repeats: int = SPEED_REPEATS) -> dict:  # fmt: skip
    """The quantized backend ``opened`` against the float model's ``float_artifact`` (a graph, or an engine
    built from the graph ``onnx``), opened with the same backend on ``opened.device`` with the same
    settings, timed side by side on ``feeds`` (:func:`time_side_by_side`). ``ratio``: float ms / quantized
    ms per call (> 1: the quantized graph is faster). ``out_dir``: artifacts are named relative to it."""
    from ditrt.runtime.open import open_denoiser

    def name(path) -> str:
        inside = out_dir is not None and Path(path).resolve().is_relative_to(Path(out_dir).resolve())
        return str(Path(path).resolve().relative_to(Path(out_dir).resolve())) if inside else Path(path).name

    with open_denoiser(float_artifact, device=opened.device, **({"onnx": onnx} if onnx is not None else {})) as floating:
        timed = time_side_by_side(floating.denoiser, opened.denoiser, feeds, device=opened.device, warmup=warmup, repeats=repeats)
        sides = {"float": floating, "quantized": opened}
        per_side = {k: {"backend": o.backend, "device": o.device, "artifact": name(o.source), **timed.pop(k)} for k, o in sides.items()}
    settings = ("ONNX Runtime's default threads for both sessions" if opened.backend == "onnxruntime"
                else "eager engine launches (no CUDA graph), one stream each, synchronised after every call")  # fmt: skip
    how = (f"median over {repeats} passes of the {len(feeds)} recorded comparison inputs (one call each), float and quantized "
           f"calls alternating (which goes first swaps every pass), after {warmup} untimed pass(es); {settings}; "
           "a call includes the input and output copies both backends make")  # fmt: skip
    return {"backend": opened.backend, "device": opened.device, "ms_per_call_float": per_side["float"]["ms_per_call"],
            "ms_per_call_quantized": per_side["quantized"]["ms_per_call"], "ratio": timed["ratio"], "ratio_is": "float ms / quantized ms",
            "rows_per_call": timed["rows_per_call"], "calls_per_pass": len(feeds), **per_side, "how": how}  # fmt: skip


def time_side_by_side(float_denoiser, quantized_denoiser, feeds: list, *, device: str = "cpu", warmup: int = SPEED_WARMUP,
                      repeats: int = SPEED_REPEATS) -> dict:  # fmt: skip
    """Per-call latency of two ``(x, t, y)`` denoisers on the same feeds (``{"x", "t", "y"}`` numpy
    arrays of one batch size, put on ``device`` once): ``warmup`` untimed passes, then ``repeats`` timed
    passes in which each feed is given to both, one after the other, the first of the pair swapping
    every pass (load from other processes falls on both alike). On CUDA every call is synchronised.
    Returns ``{"float": {...}, "quantized": {...}}`` (``ms_per_call``: the median pass's mean,
    ``ms_range``: the fastest and slowest pass) with ``ratio`` (float / quantized) and ``rows_per_call``."""
    from ditrt.contracts.errors import InputError

    rows = {len(f["x"]) for f in feeds}
    if len(rows) != 1 or repeats < 1 or warmup < 0:
        raise InputError(f"timing needs feeds of one batch size and at least one pass, got rows {sorted(rows)} and {repeats} passes")
    calls = [tuple(torch.from_numpy(np.asarray(f[k])).to(device) for k in ("x", "t", "y")) for f in feeds]
    pair = {"float": float_denoiser, "quantized": quantized_denoiser}
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda *_: None)
    with torch.no_grad():  # as the sampler calls them
        for _ in range(warmup):
            for args in calls:
                for run in pair.values():
                    run(*args)
        sync(device)
        passes: dict[str, list[float]] = {"float": [], "quantized": []}
        for r in range(repeats):
            order = ("float", "quantized") if r % 2 == 0 else ("quantized", "float")
            spent = dict.fromkeys(order, 0.0)
            for args in calls:
                for side in order:
                    start = time.perf_counter()
                    pair[side](*args)
                    sync(device)
                    spent[side] += time.perf_counter() - start
            for side in order:
                passes[side].append(1000 * spent[side] / len(calls))
    out = {side: {"ms_per_call": statistics.median(ms), "ms_range": [min(ms), max(ms)]} for side, ms in passes.items()}
    return {**out, "ratio": out["float"]["ms_per_call"] / out["quantized"]["ms_per_call"], "rows_per_call": rows.pop()}


def speed_line(speed: dict) -> str:
    """The report's one-line speed figure."""
    return (f"quantized vs float on {speed['backend']}: {speed['ratio']:.2f}x ({speed['ms_per_call_quantized']:.2f} ms vs "
            f"{speed['ms_per_call_float']:.2f} ms per call of {speed['rows_per_call']} rows)")  # fmt: skip
