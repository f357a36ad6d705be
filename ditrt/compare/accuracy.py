"""Per-output accuracy statistics between two runners on the same feeds (Polygraphy's Comparator),
and per-layer bisection of two ONNX graphs (TensorRT 11 dropped per-layer precision flags, so
``polygraphy debug precision`` no longer applies: we compare every intermediate tensor instead)."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ditrt.compare.inputs import quiet_polygraphy
from ditrt.contracts.errors import InputError


def output_stats(ref: np.ndarray, test: np.ndarray) -> dict:
    """max/mean abs error, relative L2 error, max error relative to max |ref|, cosine, SNR (dB)."""
    a, b = np.asarray(ref, np.float64).ravel(), np.asarray(test, np.float64).ravel()
    if a.shape != b.shape:
        raise InputError(f"outputs differ in size ({a.size} vs {b.size}); compare graphs of the same model")
    d = b - a
    na, nd = float(np.linalg.norm(a)), float(np.linalg.norm(d))
    nb = float(np.linalg.norm(b))
    return {
        "max_abs": float(np.abs(d).max()) if d.size else 0.0,
        "mean_abs": float(np.abs(d).mean()) if d.size else 0.0,
        "rel_l2": nd / na if na > 0 else (0.0 if nd == 0 else math.inf),
        "max_rel": float(np.abs(d).max() / max(np.abs(a).max(), 1e-30)) if d.size else 0.0,
        "cosine": float(a @ b / (na * nb)) if na > 0 and nb > 0 else (1.0 if nd == 0 else 0.0),
        "snr_db": 10 * math.log10(na**2 / nd**2) if nd > 0 else 200.0,
    }


def compare_runners(reference, test, feeds: list[dict], *, atol: float = 1e-3, rtol: float = 1e-3, error_stat: str = "elemwise") -> dict:
    """Run both Polygraphy runners on ``feeds`` and compare every common output.

    Returns ``{"reference", "test", "passed" (Polygraphy's simple atol/rtol check), "outputs":
    {name: stats over all feeds}, "per_feed": [{"t", name: rel_l2}]}``.
    """
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SimpleCompareFunc

    with quiet_polygraphy():
        results = Comparator.run([reference, test], data_loader=feeds)
        passed = bool(Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat=error_stat)))
    ref_iters, test_iters = results[reference.name], results[test.name]
    names = [n for n in ref_iters[0].keys() if n in test_iters[0]]
    outputs = {}
    for n in names:
        outputs[n] = output_stats(np.concatenate([r[n].ravel() for r in ref_iters]), np.concatenate([r[n].ravel() for r in test_iters]))
    per_feed = [
        {"t": float(np.asarray(f["t"]).ravel()[0]), **{n: output_stats(r[n], s[n])["rel_l2"] for n in names}}
        for f, r, s in zip(feeds, ref_iters, test_iters)
    ]
    return {"reference": reference.name, "test": test.name, "passed": passed, "atol": atol, "rtol": rtol, "error_stat": error_stat,
            "outputs": outputs, "per_feed": per_feed}  # fmt: skip


def per_layer(reference_onnx, test_onnx, feeds: list[dict], *, session_factory, threshold: float = 1e-2, top: int = 5) -> dict:
    """Mark every intermediate tensor of both graphs, run them on ``feeds[0]`` and compare the
    tensors both graphs have (by name), in the reference graph's order.

    ``session_factory(path) -> onnxruntime.InferenceSession`` builds sessions with ditrt's options.
    Reports the first node whose output error exceeds ``threshold`` and the ``top`` nodes where the
    error grows most between a node's inputs and its output.
    """
    import onnx
    from polygraphy import constants
    from polygraphy.backend.onnx import ModifyOutputs, OnnxFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner

    tmp = Path(tempfile.mkdtemp(prefix="ditrt-per-layer-"))

    def runner(path, name):
        with quiet_polygraphy():
            model = ModifyOutputs(OnnxFromPath(str(path)), outputs=constants.MARK_ALL)()
        marked = tmp / f"{name}.onnx"
        onnx.save(model, str(marked))
        return OnnxrtRunner(lambda: session_factory(marked), name=name), model

    (r_ref, m_ref), (r_test, _) = runner(reference_onnx, "reference"), runner(test_onnx, "test")
    try:
        with quiet_polygraphy(), r_ref, r_test:
            a, b = r_ref.infer(feeds[0]), r_test.infer(feeds[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    errors: dict[str, float] = {}
    rows = []
    for node in m_ref.graph.node:
        outs = [o for o in node.output if o in a and o in b and np.issubdtype(np.asarray(a[o]).dtype, np.floating)]
        if not outs:
            continue
        err = max(output_stats(a[o], b[o])["rel_l2"] for o in outs)
        for o in outs:
            errors[o] = err
        err_in = max([errors.get(i, 0.0) for i in node.input] or [0.0])
        rows.append({"node": node.name or outs[0], "op": node.op_type, "output": outs[0], "rel_l2": err, "growth": err - err_in})
    if not rows:
        raise InputError("the two graphs share no intermediate tensor names; per-layer comparison needs graphs of the same export")
    first = next((r for r in rows if r["rel_l2"] > threshold), None)
    return {
        "compared_tensors": len(rows),
        "threshold": threshold,
        "first_over_threshold": first,
        "largest_growth": sorted(rows, key=lambda r: -r["growth"])[:top],
        "final_rel_l2": rows[-1]["rel_l2"],
    }
