"""A rewrite ditrt applies to the graph as ONNX Runtime optimized it, where ONNX Runtime 1.32 stops short.

The Linear bias of a W8A8 graph (issue 15). ONNX Runtime fuses each ``Q -> DQ -> MatMul`` with an int8
DQ weight into ``MatMulIntegerToFloat``, whose CPU kernel adds a bias in its output stage, but its Q/DQ
fusion never fills that input (only its fusion of the explicit ``MatMulInteger -> Cast -> Mul -> Add``
form does): the bias stays a separate ``Add`` over the whole output. Folded, the built-in model's W8A8
step (64 rows, one thread) loses 18 of its Adds and 7-8 ms of about 153 ms, with the integer kernels'
time unchanged (``bench/ort_profile.py --session-options``). The exported graph cannot carry the fused form itself (``MatMulInteger``
and ``MatMulIntegerToFloat`` are no TensorRT ops), so the ONNX Runtime backend folds the bias into the
kernel after ONNX Runtime's own optimizations have chosen the kernels (and the unsigned activation
form they run on x86): :func:`fold_integer_gemm_bias` on the optimized graph, which
:func:`ditrt.runtime.onnxruntime_backend.make_session` then runs as it is. The kernel computes
``scale * acc + bias`` where the graph computed ``scale * acc`` then ``+ bias``: the same two float
operations in the same order (bit-identical on the built-in model). The price is a second session
creation and the optimized graph written once to a scratch folder: 0.2 -> 0.7 s for a W8A8 graph of
six DiT-XL/2 blocks (about 0.1 s and, while the session is made, 50 MB of scratch per block).
"""

from __future__ import annotations

import onnx

KERNEL, DOMAIN = "MatMulIntegerToFloat", "com.microsoft"
#: MatMulIntegerToFloat's inputs: A, B, a_scale, b_scale, a_zero_point, b_zero_point, bias.
BIAS_INPUT = 6


def fold_integer_gemm_bias(graph: onnx.GraphProto) -> int:
    """Move the constant bias of each ``Add`` that alone consumes a ``MatMulIntegerToFloat``'s output
    into that kernel's bias input, and drop the ``Add``. Only where it is exact and unambiguous: a
    float32 bias initializer of shape (N,) for a constant 2-D weight (K, N), a kernel with no bias yet,
    an output that is no graph output. Returns the number of biases folded."""
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    folded = []
    for node in graph.node:
        if node.op_type != KERNEL or node.domain != DOMAIN or len(node.input) > BIAS_INPUT and node.input[BIAS_INPUT]:
            continue
        out = node.output[0]
        users = consumers.get(out, [])
        if out in graph_outputs or len(users) != 1 or users[0].op_type != "Add" or users[0].domain not in ("", "ai.onnx"):
            continue
        add = users[0]
        bias = next((inits.get(i) for i in add.input if i != out), None)
        weight = inits.get(node.input[1])
        if bias is None or weight is None or len(weight.dims) != 2 or list(add.input).count(out) != 1:
            continue
        if bias.data_type != onnx.TensorProto.FLOAT or list(bias.dims) != [weight.dims[1]]:
            continue
        inputs = list(node.input) + [""] * (BIAS_INPUT - len(node.input))
        del node.input[:]
        node.input.extend(inputs[:BIAS_INPUT] + [bias.name])
        node.output[0] = add.output[0]
        folded.append(add)
    for add in folded:
        graph.node.remove(add)
    return len(folded)
