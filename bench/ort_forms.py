"""Graph forms side by side in ONNX Runtime: the alternatives issue 15 weighed for ditrt's graphs.

Each case is a small hand-written ONNX graph at a DiT's shapes (default: the built-in model's step,
64 rows x 64 tokens x 192 channels, 3 heads; ``--xl``: DiT-XL/2's, 8 rows x 256 tokens x 1152, 16
heads), run in ONNX Runtime on one thread with the session settings named, timed in interleaved
repeats (median ms per run) and checked to compute the same values as the first form of its case.
The kernels each form ends up running (after ONNX Runtime's fusions) are listed.

    .venv/bin/python bench/ort_forms.py            # built-in shapes
    .venv/bin/python bench/ort_forms.py --xl       # DiT-XL/2 shapes
    .venv/bin/python bench/ort_forms.py --cases attention   # one case (file forms-builtin-attention)

Cases: ``layernorm`` (residual Add + LayerNorm, SkipLayerNormFusion on vs off), ``modulate`` (LayerNorm
then ``* (1 + scale) + shift`` vs a LayerNormalization taking the per-sample scale and shift),
``gelu`` (bias + tanh GELU fused to FastGelu vs unfused), ``attention`` (the exported
qkv -> (3, N, H, T, Dh) transpose vs a q/k/v split on the channels, that transpose split on its first
axis, k transposed straight to (N, H, Dh, T), and per-head slices), ``bias`` (a
Q/DQ Linear with its bias: the fused int8 kernel and its inputs; MatMulAddFusion on a static-shape
graph), ``patch embedding`` (stride-p Conv vs the patches and one MatMul). Results: ``bench/results/ort_profile/forms-<shape>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import procstat

DITRT = ("MatMulAddFusion", "SkipLayerNormFusion")  # ditrt's disabled optimizers (runtime/onnxruntime_backend.py)


def _h():
    from onnx import TensorProto, helper, numpy_helper

    return helper, TensorProto, numpy_helper


def model(nodes, inputs: dict, outputs: dict, inits: dict | None = None):
    helper, tp, nh = _h()
    vi = [helper.make_tensor_value_info(n, tp.FLOAT, s) for n, s in inputs.items()]
    vo = [helper.make_tensor_value_info(n, tp.FLOAT, s) for n, s in outputs.items()]
    g = helper.make_graph(nodes, "form", vi, vo, [nh.from_array(v, k) for k, v in (inits or {}).items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def session(m, disabled: tuple, work: Path, name: str):
    """(session, kernels ONNX Runtime runs) for model ``m``; a refused session gives (None, why)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.optimized_model_filepath = str(work / f"{name}.optimized.onnx")
    try:
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
    except Exception as e:  # noqa: BLE001  a refused form is a result
        return None, f"refused: {str(e).strip().splitlines()[0][:150]}"
    g = onnx.load(so.optimized_model_filepath).graph
    return s, ", ".join(f"{n} {op}({k} inputs)" for (op, k), n in Counter((x.op_type, len(x.input)) for x in g.node).items())


# ------------------------------------------------------------------------------------------- cases
def case_layernorm(r, t, d, rng):
    helper = _h()[0]
    nodes = [helper.make_node("Add", ["x", "y"], ["s"]), helper.make_node("LayerNormalization", ["s", "one"], ["out"], axis=-1, epsilon=1e-6)]
    m = model(nodes, {"x": [r, t, d], "y": [r, t, d]}, {"out": [r, t, d]}, {"one": np.ones(d, np.float32)})
    feeds = {"x": rng.standard_normal((r, t, d), np.float32), "y": rng.standard_normal((r, t, d), np.float32)}
    return feeds, {"Add + LayerNormalization (ditrt: SkipLayerNormFusion off)": (m, DITRT),
                   "SkipLayerNormalization (fusion on, ditrt before issue 15)": (m, DITRT[:1])}  # fmt: skip


def case_modulate(r, t, d, rng):
    helper = _h()[0]
    io = {"x": [r, t, d], "scale": [r, 1, d], "shift": [r, 1, d]}
    plain = model([helper.make_node("LayerNormalization", ["x", "one"], ["n"], axis=-1, epsilon=1e-6),
                   helper.make_node("Mul", ["n", "scale"], ["m"]), helper.make_node("Add", ["m", "shift"], ["out"])],
                  io, {"out": [r, t, d]}, {"one": np.ones(d, np.float32)})  # fmt: skip
    folded = model([helper.make_node("LayerNormalization", ["x", "scale", "shift"], ["out"], axis=-1, epsilon=1e-6)], io, {"out": [r, t, d]})
    feeds = {k: rng.standard_normal(s, np.float32) for k, s in io.items()}
    return feeds, {"LayerNorm, Mul, Add (exported)": (plain, DITRT), "LayerNormalization with per-sample scale/bias": (folded, DITRT)}


def case_gelu(r, t, d, rng):
    helper = _h()[0]
    f = 4 * d
    m = model([helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Gelu", ["a"], ["out"], approximate="tanh")],
              {"x": [r, t, f]}, {"out": [r, t, f]}, {"b": rng.standard_normal(f, np.float32)})  # fmt: skip
    feeds = {"x": rng.standard_normal((r, t, f), np.float32)}
    unfused = DITRT + ("BiasGeluFusion", "FastGeluFusion", "GeluFusion")
    return feeds, {"FastGelu with bias (ONNX Runtime's fusion)": (m, DITRT), "Add + Gelu(tanh)": (m, unfused)}


def case_attention(r, t, d, rng, heads):
    """q, k, v from the qkv output (r, t, 3d) to softmax(q k^T / sqrt(dh)) v, merged back to (r, t, d)."""
    helper, _, _ = _h()
    dh = d // heads
    scale = np.array(dh**-0.5, np.float32)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    # exported: Reshape (r, t, 3, H, Dh) -> Transpose (3, r, H, t, Dh) -> Gather 0/1/2
    n = [helper.make_node("Reshape", ["qkv", "s5"], ["r5"]), helper.make_node("Transpose", ["r5"], ["p"], perm=[2, 0, 3, 1, 4])]
    n += [helper.make_node("Gather", ["p", f"i{j}"], [c], axis=0) for j, c in enumerate("qkv")]
    n += _attend("q", "k", "v", "out", r, t, d)
    inits = {"s5": i64(r, t, 3, heads, dh), **{f"i{j}": np.array(j, np.int64) for j in range(3)}, "sc": scale, "s3": i64(r, t, d)}
    exported = model(n, {"qkv": [r, t, 3 * d]}, {"out": [r, t, d]}, inits)
    # channel split: Split (r, t, 3d) into q, k, v, each Reshape (r, t, H, Dh) -> Transpose (r, H, t, Dh)
    n = [helper.make_node("Split", ["qkv", "sp"], ["q0", "k0", "v0"], axis=2)]
    for c in "qkv":
        n += [helper.make_node("Reshape", [f"{c}0", "s4"], [f"{c}1"]), helper.make_node("Transpose", [f"{c}1"], [c], perm=[0, 2, 1, 3])]
    n += _attend("q", "k", "v", "out", r, t, d)
    split = model(n, {"qkv": [r, t, 3 * d]}, {"out": [r, t, d]}, {"sp": i64(d, d, d), "s4": i64(r, t, heads, dh), "sc": scale, "s3": i64(r, t, d)})
    # per head: Split into 3H slices (r, t, Dh); per head MatMul(q, k^T), Softmax, MatMul(., v); Concat
    n = [helper.make_node("Split", ["qkv", "sp"], [f"{c}{h}" for c in "qkv" for h in range(heads)], axis=2)]
    for h in range(heads):
        n += [helper.make_node("Transpose", [f"k{h}"], [f"kt{h}"], perm=[0, 2, 1]), helper.make_node("Mul", [f"q{h}", "sc"], [f"qs{h}"]),
              helper.make_node("MatMul", [f"qs{h}", f"kt{h}"], [f"a{h}"]), helper.make_node("Softmax", [f"a{h}"], [f"p{h}"], axis=-1),
              helper.make_node("MatMul", [f"p{h}", f"v{h}"], [f"o{h}"])]  # fmt: skip
    n.append(helper.make_node("Concat", [f"o{h}" for h in range(heads)], ["out"], axis=2))
    per_head = model(n, {"qkv": [r, t, 3 * d]}, {"out": [r, t, d]}, {"sp": i64(*[dh] * 3 * heads), "sc": scale})
    # transpose first, then split the contiguous (3, r, H, t, Dh) tensor on its first axis
    n = [helper.make_node("Reshape", ["qkv", "s5"], ["r5"]), helper.make_node("Transpose", ["r5"], ["p"], perm=[2, 0, 3, 1, 4]),
         helper.make_node("Split", ["p"], ["q1", "k1", "v1"], axis=0, num_outputs=3)]
    n += [helper.make_node("Squeeze", [f"{c}1", "ax0"], [c]) for c in "qkv"]
    n += _attend("q", "k", "v", "out", r, t, d)
    split_first_axis = model(n, {"qkv": [r, t, 3 * d]}, {"out": [r, t, d]}, {**inits, "ax0": np.array([0], np.int64)})
    # k transposed straight to (r, H, Dh, t) from the channel split, q and v to (r, H, t, Dh)
    n = [helper.make_node("Split", ["qkv", "sp"], ["q0", "k0", "v0"], axis=2)]
    n += [helper.make_node("Reshape", [f"{c}0", "s4"], [f"{c}1"]) for c in "qkv"]
    n += [helper.make_node("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3]), helper.make_node("Transpose", ["v1"], ["v"], perm=[0, 2, 1, 3]),
          helper.make_node("Transpose", ["k1"], ["kt"], perm=[0, 2, 3, 1]), helper.make_node("Mul", ["q", "sc"], ["qs"]),
          helper.make_node("MatMul", ["qs", "kt"], ["att"]), helper.make_node("Softmax", ["att"], ["pr"], axis=-1),
          helper.make_node("MatMul", ["pr", "v"], ["o"]), helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
          helper.make_node("Reshape", ["ot", "s3"], ["out"])]  # fmt: skip
    k_direct = model(n, {"qkv": [r, t, 3 * d]}, {"out": [r, t, d]}, {"sp": i64(d, d, d), "s4": i64(r, t, heads, dh), "sc": scale, "s3": i64(r, t, d)})
    feeds = {"qkv": rng.standard_normal((r, t, 3 * d), np.float32)}
    return feeds, {"exported (one 5-D transpose, then q/k/v)": (exported, DITRT), "channel split, 3 transposes": (split, DITRT),
                   "5-D transpose, split on its first axis": (split_first_axis, DITRT),
                   "channel split, k transposed straight to (N, H, Dh, T)": (k_direct, DITRT),
                   "per-head slices, no transposes": (per_head, DITRT)}  # fmt: skip


def _attend(q, k, v, out, r, t, d):
    helper = _h()[0]
    return [helper.make_node("Mul", [q, "sc"], ["qs"]), helper.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["qs", "kt"], ["att"]), helper.make_node("Softmax", ["att"], ["pr"], axis=-1),
            helper.make_node("MatMul", ["pr", v], ["o"]), helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["ot", "s3"], [out])]  # fmt: skip


def case_patch(r, c, size, p, d, rng):
    """The patch embedding: a stride-p Conv then (N, D, T) -> (N, T, D), vs the patches gathered from the
    input and one MatMul by the conv weight seen as (D, C*p*p) (what ditrt exports)."""
    helper = _h()[0]
    g = size // p
    w, b = rng.standard_normal((d, c, p, p), np.float32), rng.standard_normal(d, np.float32)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    io, out = {"x": [r, c, size, size]}, {"out": [r, g * g, d]}
    conv = model([helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[p, p], strides=[p, p]),
                  helper.make_node("Reshape", ["y", "s"], ["f"]), helper.make_node("Transpose", ["f"], ["out"], perm=[0, 2, 1])],
                 io, out, {"w": w, "b": b, "s": i64(r, d, g * g)})  # fmt: skip
    matmul = model([helper.make_node("Reshape", ["x", "s6"], ["x6"]), helper.make_node("Transpose", ["x6"], ["t6"], perm=[0, 2, 4, 1, 3, 5]),
                    helper.make_node("Reshape", ["t6", "s3"], ["pt"]), helper.make_node("MatMul", ["pt", "wt"], ["m"]),
                    helper.make_node("Add", ["m", "b"], ["out"])], io, out,
                   {"wt": np.ascontiguousarray(w.reshape(d, -1).T), "b": b, "s6": i64(r, c, g, p, g, p), "s3": i64(r, g * g, c * p * p)})  # fmt: skip
    feeds = {"x": rng.standard_normal((r, c, size, size), np.float32)}
    return feeds, {"Conv + Transpose (ditrt before issue 15)": (conv, DITRT), "patches + MatMul (ditrt)": (matmul, DITRT)}


def case_bias(r, t, d, rng, static: bool):
    """A W8A8 Linear (d -> 3d) with its bias as ditrt exports it: Q/DQ input, int8 DQ weight, MatMul, Add."""
    helper = _h()[0]
    n_out = 3 * d
    inits = {"wq": rng.integers(-127, 128, (d, n_out)).astype(np.int8), "ws": np.full(n_out, 0.01, np.float32),
             "xs": np.array(0.02, np.float32), "xz": np.array(0, np.int8), "b": rng.standard_normal(n_out, np.float32)}  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=1), helper.make_node("MatMul", ["xd", "wd"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["out"])]  # fmt: skip
    batch = r if static else "batch"
    m = model(nodes, {"x": [batch, t, d]}, {"out": [batch, t, n_out]}, inits)
    feeds = {"x": rng.standard_normal((r, t, d), np.float32)}
    what = "static" if static else "dynamic"
    return feeds, {f"{what} batch, ditrt's settings": (m, DITRT), f"{what} batch, MatMulAddFusion on": (m, DITRT[1:])}


# ----------------------------------------------------------------------------------------- running
def run_case(name, feeds, forms, args, work: Path) -> dict:
    sessions, rows = {}, {}
    for i, (form, (m, disabled)) in enumerate(forms.items()):
        s, kernels = session(m, disabled, work, f"{name}-{i}")
        rows[form] = {"disabled_optimizers": list(disabled), "kernels": kernels}
        if s is not None:
            sessions[form] = s
    outs = {f: s.run(None, feeds)[0] for f, s in sessions.items()}
    first = next(iter(outs.values()), None)
    for f in outs:
        rows[f]["max_abs_diff_vs_first"] = float(np.abs(outs[f] - first).max())
    times = {f: [] for f in sessions}
    for s in sessions.values():
        s.run(None, feeds)
    for _ in range(args.repeats):
        for f, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(args.calls):
                s.run(None, feeds)
            times[f].append(1000 * (time.perf_counter() - t0) / args.calls)
    for f, v in times.items():
        rows[f].update(ms=statistics.median(v), spread=[min(v), max(v)])
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--xl", action="store_true", help="DiT-XL/2 shapes (8 rows x 256 tokens x 1152, 16 heads)")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--cases", nargs="+", default=None, help="only these cases (e.g. attention); the file name says which")
    p.add_argument("--out", type=Path, default=HERE / "results" / "ort_profile")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import os
    import tempfile

    import onnxruntime

    args = parse_args(argv)
    onnxruntime.set_default_logger_severity(3)
    r, t, d, heads = (8, 256, 1152, 16) if args.xl else (64, 64, 192, 3)
    rng = np.random.default_rng(0)
    load = os.getloadavg()[0]
    cases = {
        "layernorm": case_layernorm(r, t, d, rng), "modulate": case_modulate(r, t, d, rng), "gelu": case_gelu(r, t, d, rng),
        "attention": case_attention(r, t, d, rng, heads), "bias (dynamic batch)": case_bias(r, t, d, rng, False),
        "bias (static batch)": case_bias(r, t, d, rng, True),
        "patch embedding": case_patch(r, 4, 32, 2, d, rng) if args.xl else case_patch(r, 1, 8, 1, d, rng),
    }  # fmt: skip
    if args.cases:
        unknown = sorted(set(args.cases) - set(cases))
        if unknown:
            raise SystemExit(f"ort_forms.py: error: unknown case(s) {', '.join(unknown)}; pick from {', '.join(cases)}")
        cases = {k: v for k, v in cases.items() if k in args.cases}
    with tempfile.TemporaryDirectory(prefix="ditrt-ort-forms-") as tmp:
        results = {name: run_case(name, feeds, forms, args, Path(tmp)) for name, (feeds, forms) in cases.items()}
    lines = [f"Shapes: {r} rows x {t} tokens x {d} channels, {heads} heads; one thread; ONNX Runtime {onnxruntime.__version__}; "
             f"median of {args.repeats} interleaved repeats of {args.calls} runs; 1-minute load average {load:.2f} at start.", "",
             "| case | form | ms | spread | max abs diff vs first | kernels ONNX Runtime runs (inputs) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, rows in results.items():
        for form, v in rows.items():
            ms = f"{v['ms']:.3f} | {v['spread'][0]:.3f}-{v['spread'][1]:.3f}" if "ms" in v else "- | -"
            diff = f"{v['max_abs_diff_vs_first']:.1e}" if "max_abs_diff_vs_first" in v else "-"
            lines.append(f"| {name} | {form} | {ms} | {diff} | {v['kernels']} |")
    name = ("forms-xl" if args.xl else "forms-builtin") + ("".join(f"-{c.split()[0]}" for c in args.cases) if args.cases else "")
    procstat.write_results(args.out, name, {"shapes": [r, t, d, heads], "load_average_at_start": load, "results": results},
                           f"ONNX Runtime graph forms at {'DiT-XL/2' if args.xl else 'built-in'} shapes", "\n".join(lines) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
