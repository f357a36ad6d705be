"""ONNX files written and read one initializer at a time, so that no step holds the weights twice.

An ONNX graph under 2 GiB is one protobuf message with its weights inline. Serialising it the
usual way (``onnx_ir`` to a ``ModelProto``, then ``SerializeToString``) holds two more copies of
every weight beside the model's own, and ``onnx.load`` holds the file's bytes and the parsed
message together: for a float16 DiT-XL/2 (1.3 GB) either step needs 2.6 GB more.

The protobuf wire format lets both be done piecewise. A message is its fields in order, each a tag,
and for a sub-message a length then its bytes, so:

- :func:`save_protobuf` serialises the model without its initializers (through ``onnx_ir.save``,
  a few MB), then writes that file again with each initializer spliced in where the serialiser puts
  them (``GraphProto`` field 5, after the nodes and the name), one ``TensorProto`` at a time. The
  bytes are those of ``onnx_ir.save`` of the whole model.
- :func:`load_lazily` parses a file's structure and leaves the bytes of each large inline tensor in
  the file: the tensor becomes a reference to its own bytes in that file (ONNX external data with
  the graph's name as location), so the checker, shape inference and :mod:`ditrt.export.check` read
  each weight only when they ask for it.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from ditrt.contracts.errors import ArtifactError

#: ``GraphProto.initializer``, ``ModelProto.graph`` and ``TensorProto.raw_data`` field numbers.
_INITIALIZER, _GRAPH, _RAW_DATA = 5, 7, 9
_LENGTH_DELIMITED = 2
#: Inline tensors up to this many bytes stay parsed: shape inference reads small constants (Reshape
#: shapes, Slice bounds) and refuses them as external data; the export's external data uses the same limit.
INLINE_BYTES = 1024
#: ONNX element types stored two per byte.
_PACKED_4BIT = {"INT4", "UINT4", "FLOAT4E2M1"}


# ------------------------------------------------------------------------------------ wire format
def _varint(buf, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(number, wire type, tag start, value start, value end)`` of each field in ``buf[start:end]``;
    a length-delimited value spans its payload only."""
    i = start
    while i < end:
        tag_start = i
        tag, i = _varint(buf, i, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value_start = i
            _, i = _varint(buf, i, end)
        elif wire in (1, 5):
            value_start, i = i, i + (8 if wire == 1 else 4)
        elif wire == _LENGTH_DELIMITED:
            length, value_start = _varint(buf, i, end)
            i = value_start + length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > end:
            raise ValueError("field runs past the end of its message")
        yield number, wire, tag_start, value_start, i


def _length_delimited(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited field ``number`` of ``length`` bytes."""
    return _encode_varint(number << 3 | _LENGTH_DELIMITED) + _encode_varint(length)


# ------------------------------------------------------------------------------------------ save
def save_protobuf(ir_model, path: Path) -> None:
    """Write ``ir_model`` to ``path`` as one protobuf file, byte for byte what
    ``onnx_ir.save(ir_model, path, format="protobuf")`` writes, holding one initializer at a time."""
    import onnx_ir as ir

    path = Path(path)
    values = [v for v in ir_model.graph.initializers.values() if v.const_value is not None]
    tensors = [v.const_value for v in values]
    serde_log = logging.getLogger(ir.serde.__name__)  # it warns once per initializer without a value
    level = serde_log.level
    try:
        serde_log.setLevel(logging.ERROR)
        for v in values:
            v.const_value = None
        ir.save(ir_model, path, format="protobuf")  # the structure: every field but the initializers
    finally:
        serde_log.setLevel(level)
        for v, t in zip(values, tensors, strict=True):
            v.const_value = t
    structure = path.read_bytes()
    split = _splice_points(structure)
    if split is None:  # a serialiser that does not write fields in number order: the whole model at once
        ir.save(ir_model, path, format="protobuf")
        return
    graph_tag, graph_start, graph_end, init_at = split
    sizes = [_tensor_proto(v).ByteSize() for v in values]
    graph_len = graph_end - graph_start + sum(len(_length_delimited(_INITIALIZER, n)) + n for n in sizes)
    with open(path, "wb") as f:
        f.write(structure[:graph_tag])
        f.write(_length_delimited(_GRAPH, graph_len))
        f.write(structure[graph_start:init_at])
        for v, n in zip(values, sizes, strict=True):
            data = _tensor_proto(v).SerializeToString()
            if len(data) != n:
                raise RuntimeError(f"initializer {v.name} serialised to {len(data)} bytes, not {n}")
            f.write(_length_delimited(_INITIALIZER, n))
            f.write(data)
            del data
        f.write(structure[init_at:])


def _tensor_proto(value):
    import onnx_ir as ir

    value.const_value.name = value.name  # as the serialiser does
    return ir.serde.serialize_tensor(value.const_value)


def _splice_points(structure: bytes) -> tuple[int, int, int, int] | None:
    """(graph tag offset, graph payload start, graph payload end, where initializers go) in a model
    serialised without initializers; None unless the graph's fields are in field-number order."""
    graphs = [(t, s, e) for n, w, t, s, e in _fields(structure, 0, len(structure)) if n == _GRAPH and w == _LENGTH_DELIMITED]
    if len(graphs) != 1:
        return None
    tag, start, end = graphs[0]
    numbers, at = [], end
    for n, _, t, _, _ in _fields(structure, start, end):
        if n > _INITIALIZER and at == end:
            at = t
        numbers.append(n)
    if _INITIALIZER in numbers or numbers != sorted(numbers):
        return None
    return tag, start, end, at


# ------------------------------------------------------------------------------------------ load
def load_lazily(path: Path) -> tuple[object, dict[str, tuple[int, int]]]:
    """``(model, spans)``: the ``onnx.ModelProto`` at ``path`` whose inline tensors over
    :data:`INLINE_BYTES` are external references to their own bytes in ``path`` (location: its file
    name), and ``spans``: tensor name -> (offset, length) of those bytes. Tensors already in external
    data are left as they are. Raises ArtifactError for a file that is not an ONNX model."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX file {path} not found; create it with `ditrt export`")
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ValueError("empty file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse_model(onnx, buf, path.name)
    except (ValueError, DecodeError) as e:
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(e).__name__}); re-export it with `ditrt export`") from None


def _parse_model(onnx, buf, location: str):
    rest, graphs, spans = [], [], {}
    for number, wire, tag, start, end in _fields(buf, 0, len(buf)):
        if number == _GRAPH and wire == _LENGTH_DELIMITED:
            graphs.append((start, end))
        else:
            rest.append(buf[tag:end])
    model = onnx.ModelProto.FromString(b"".join(rest))
    for start, end in graphs:  # protobuf merges repeated occurrences of a message field
        others, inits = [], []
        for number, wire, tag, s, e in _fields(buf, start, end):
            if number == _INITIALIZER and wire == _LENGTH_DELIMITED:
                inits.append(_parse_tensor(onnx, buf, s, e, location, spans))
            else:
                others.append(buf[tag:e])
        model.graph.MergeFromString(b"".join(others))
        model.graph.initializer.extend(inits)
    return model, spans


def _parse_tensor(onnx, buf, start: int, end: int, location: str, spans: dict):
    raw = [(t, s, e) for n, w, t, s, e in _fields(buf, start, end) if n == _RAW_DATA and w == _LENGTH_DELIMITED]
    if len(raw) != 1 or raw[0][2] - raw[0][1] <= INLINE_BYTES:
        return onnx.TensorProto.FromString(buf[start:end])
    tag, s, e = raw[0]
    t = onnx.TensorProto.FromString(buf[start:tag] + buf[e:end])
    if t.data_location == onnx.TensorProto.EXTERNAL or t.external_data or _nbytes(onnx, t) != e - s:
        return onnx.TensorProto.FromString(buf[start:end])  # unusual: left as it is, for the checker to judge
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(s)), ("length", str(e - s))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    spans[t.name] = (s, e - s)
    return t


def _nbytes(onnx, t) -> int | None:
    """Bytes of raw data a tensor of ``t``'s type and dims holds (None for types without a fixed size)."""
    n = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
    name = onnx.TensorProto.DataType.Name(t.data_type) if t.data_type in onnx.TensorProto.DataType.values() else ""
    if name in _PACKED_4BIT:
        return (n + 1) // 2
    try:
        return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def read_span(path: Path, span: tuple[int, int]) -> bytes:
    """The ``(offset, length)`` bytes of ``path`` (a tensor :func:`load_lazily` left in the file)."""
    offset, length = span
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise ArtifactError(f"{path} ends inside a tensor (truncated file); re-export it with `ditrt export`")
    return data
