"""Model <-> bytes: safetensors payloads, ~1 MiB chunks, and validation of what arrives.

Pure (no grpc import) so it can be round-trip tested on its own. The payload format is safetensors:
a JSON header plus raw little-endian tensor bytes; nothing received is ever unpickled. A received
payload is checked against the local model's manifest before it is trusted: byte total bounded
before allocation, digest, tensor names, dtypes, shapes, and finite values.

Large models make every pass over the bytes count (benchmarks/bench_fetch.py), so the fetch path
touches each byte as few times as it can: the server frames chunks as serialized ``ModelChunk``
messages itself (``frames``, one copy instead of protobuf's three), the client reads each chunk's
data in place in the received message (``split_chunk``), the assembler hashes while it copies into
the one buffer it returns, and ``parse`` makes tensors that view that buffer instead of copying.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
import xxhash

from mtl_node.errors import (
    BadPayload,
    DigestMismatch,
    ManifestMismatch,
    NonFiniteModel,
    PayloadTooLarge,
    TruncatedPayload,
)
from mtl_node.proto.v1 import node_pb2 as pb

StateDict = dict[str, torch.Tensor]

FORMAT = "safetensors"
CHUNK_BYTES = 1 << 20
# gRPC message cap on both ends: one chunk plus protobuf framing and the header message.
MAX_MESSAGE_BYTES = CHUNK_BYTES + (64 << 10)
# Room for the safetensors JSON header on top of the raw tensor bytes.
HEADER_SLACK_BYTES = 8 + 4096
HEADER_BYTES_PER_TENSOR = 256

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n * _itemsize(self.dtype)


@dataclass(frozen=True)
class Manifest:
    """What a model looks like on the wire: the contract a received payload must match."""

    tensors: tuple[TensorSpec, ...]

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def max_payload_bytes(self) -> int:
        """The largest payload a well-formed model with this manifest can have."""
        return self.data_bytes + HEADER_SLACK_BYTES + HEADER_BYTES_PER_TENSOR * len(self.tensors)

    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}


def _itemsize(dtype: str) -> int:
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
    sizes |= {"U8": 1, "BOOL": 1}
    if dtype not in sizes:
        raise ManifestMismatch(f"unsupported dtype {dtype}")
    return sizes[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be sent on the wire") from None


def manifest_of(state: Mapping[str, torch.Tensor]) -> Manifest:
    return Manifest(
        tuple(
            TensorSpec(name, dtype_name(t.dtype), tuple(int(d) for d in t.shape))
            for name, t in sorted(state.items())
        )
    )


def encode(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize a state dict to safetensors bytes (tensors moved to CPU, made contiguous).

    Written out here instead of with ``safetensors.torch.save``, which holds two more copies of a
    large model while it works; this makes the one it returns. As in the library, tensors are laid
    out by decreasing element size, then name, after a header padded to 8 bytes, so every tensor
    is aligned for ``parse`` to view in place.
    """
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    order = sorted(cpu, key=lambda name: (-cpu[name].element_size(), name))
    header: dict[str, dict[str, object]] = {}
    offset = 0
    for name in order:
        t = cpu[name]
        end = offset + t.numel() * t.element_size()
        header[name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    data = [cpu[name].reshape(-1).view(torch.uint8).numpy().data for name in order]
    return b"".join([len(text).to_bytes(_LENGTH_PREFIX, "little"), text, *data])


Buffer = bytes | bytearray | memoryview
# The header's digest is "<algorithm>:<hex>". It detects truncation and corruption in transit; it
# cannot authenticate anything (a Byzantine peer computes a valid digest for whatever it sends;
# validation and the rule are the defence against content). So agents send a fast
# non-cryptographic xxh3-128 (several GB/s, where sha256 runs under 1 GB/s here and would cap a
# large fetch: docs/performance.md), and receivers also accept sha256 from other clients.
_HASHERS: dict[str, Callable[[], Any]] = {"xxh3-128": xxhash.xxh3_128, "sha256": hashlib.sha256}
DIGEST_ALGORITHM = "xxh3-128"


def digest(payload: Buffer, algorithm: str = DIGEST_ALGORITHM) -> str:
    hasher = _HASHERS[algorithm]()
    hasher.update(payload)
    return f"{algorithm}:{hasher.hexdigest()}"


def _hasher_for(expected_digest: str) -> Any:
    algorithm, sep, _ = expected_digest.partition(":")
    if not sep or algorithm not in _HASHERS:
        raise BadPayload(
            f"digest {expected_digest[:40]!r} is not <algorithm>:<hex> with one of {', '.join(_HASHERS)}"
        )
    return _HASHERS[algorithm]()


def chunks(payload: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Slices of ``payload`` of at most ``chunk_bytes`` (at least one, even for empty payloads)."""
    view = memoryview(payload)
    if not view:
        yield b""
        return
    for start in range(0, len(view), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


# -- ModelChunk framing, built and read without protobuf copying the data ---------------------------

_CHUNK_FIELDS = pb.ModelChunk.DESCRIPTOR.fields_by_name
_HEADER_FIELD = _CHUNK_FIELDS["header"].number
_DATA_FIELD = _CHUNK_FIELDS["data"].number
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5  # protobuf wire types


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


_DATA_TAG = _varint(_DATA_FIELD << 3 | _LEN)


def frames(payload: bytes, header: pb.ModelHeader, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """``payload`` as serialized ``ModelChunk`` messages of ``chunks``, the header in the first.

    Byte for byte what ``ModelChunk(header=..., data=chunk).SerializeToString()`` gives, built with
    one copy of the data where protobuf makes three (slice, message field, serialization).
    """
    first = pb.ModelChunk(header=header).SerializeToString()
    view = memoryview(payload)
    for index, start in enumerate(range(0, max(len(view), 1), chunk_bytes)):
        piece = view[start : start + chunk_bytes]
        yield b"".join((first if index == 0 else b"", _DATA_TAG, _varint(len(piece)), piece))


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    for shift in range(0, 70, 7):
        if pos >= len(view):
            raise BadPayload("chunk message ends inside a varint")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
    raise BadPayload("chunk message has a varint longer than 10 bytes")


def split_chunk(message: bytes) -> tuple[bytes | None, memoryview]:
    """(serialized header or None, data) of one serialized ``ModelChunk``; the data is not copied.

    Reads the protobuf wire format the way protobuf does: unknown fields are skipped, a repeated
    header is merged (serialized messages concatenate into their merge), the last data field wins.
    Anything malformed is a BadPayload.
    """
    view = memoryview(message)
    end = len(view)
    pos = 0
    headers: list[memoryview] = []
    data = view[0:0]
    while pos < end:
        key, pos = _read_varint(view, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise BadPayload("chunk message has field number 0")
        if field in (_HEADER_FIELD, _DATA_FIELD) and wire_type != _LEN:
            raise BadPayload(f"chunk field {field} has wire type {wire_type}, expected {_LEN}")
        if wire_type == _LEN:
            length, pos = _read_varint(view, pos)
            if length > end - pos:
                raise BadPayload("chunk field runs past the end of the message")
            value = view[pos : pos + length]
            pos += length
            if field == _HEADER_FIELD:
                headers.append(value)
            elif field == _DATA_FIELD:
                data = value
        elif wire_type == _VARINT:
            _, pos = _read_varint(view, pos)
        elif wire_type in (_I64, _I32):
            pos += 8 if wire_type == _I64 else 4
            if pos > end:
                raise BadPayload("chunk message ends inside a fixed-size field")
        else:
            raise BadPayload(f"chunk message has a field of unsupported wire type {wire_type}")
    return (b"".join(headers) if headers else None), data


def check_header(total_bytes: int, fmt: str, manifest: Manifest) -> None:
    """Reject a stream before receiving it when its announced size or format cannot be right."""
    if fmt != FORMAT:
        raise BadPayload(f"format {fmt!r} is not {FORMAT!r}")
    if total_bytes > manifest.max_payload_bytes:
        raise PayloadTooLarge(
            f"announced {total_bytes} bytes, the manifest allows at most {manifest.max_payload_bytes}"
        )
    if total_bytes < manifest.data_bytes:
        raise TruncatedPayload(
            f"announced {total_bytes} bytes, the manifest needs at least {manifest.data_bytes}"
        )


class PayloadAssembler:
    """Collects streamed chunks into one buffer, enforcing the announced size and digest.

    Each chunk is hashed as it is copied in, while it is still in cache, and ``finish`` hands over
    the buffer itself: one pass of copying and one of hashing over the payload, nothing more.
    """

    def __init__(self, total_bytes: int, expected_digest: str, fmt: str, manifest: Manifest):
        check_header(total_bytes, fmt, manifest)
        self.total_bytes = total_bytes
        self.expected_digest = expected_digest
        self._buffer = bytearray(total_bytes)
        self._view = memoryview(self._buffer)
        self._hash = _hasher_for(expected_digest)
        self._filled = 0

    def add(self, data: Buffer) -> None:
        size = memoryview(data).nbytes
        end = self._filled + size
        if end > self.total_bytes:
            raise PayloadTooLarge(f"received more than the announced {self.total_bytes} bytes")
        self._view[self._filled : end] = data
        self._hash.update(data)
        self._filled = end

    def finish(self) -> bytearray:
        """The payload, once complete and matching its digest (the caller owns the buffer)."""
        if self._filled != self.total_bytes:
            raise TruncatedPayload(f"received {self._filled} of {self.total_bytes} bytes")
        algorithm = self.expected_digest.partition(":")[0]
        if f"{algorithm}:{self._hash.hexdigest()}" != self.expected_digest:
            raise DigestMismatch("payload digest does not match the header")
        self._view.release()
        return self._buffer


_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_LENGTH_PREFIX = 8  # safetensors: u64 little-endian length of the JSON header


def _layout(view: memoryview, max_header: int) -> list[tuple[str, torch.dtype, tuple[int, ...], int, int]]:
    """(name, dtype, shape, start, stop) of every tensor, offsets into the whole payload.

    As strict as the safetensors library: a JSON object header, known dtypes, sizes that match the
    shapes, and tensor data that covers the rest of the payload exactly, without gaps or overlaps.
    """
    size = len(view)
    if size < _LENGTH_PREFIX:
        raise BadPayload(f"not a safetensors payload: {size} bytes, shorter than its length prefix")
    n = int.from_bytes(view[:_LENGTH_PREFIX], "little")
    if n > min(size - _LENGTH_PREFIX, max_header):
        raise BadPayload(f"not a safetensors payload: a {n}-byte header in {size} bytes")
    try:
        header = json.loads(bytes(view[_LENGTH_PREFIX : _LENGTH_PREFIX + n]))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise BadPayload(f"not a safetensors payload: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise BadPayload("not a safetensors payload: header is not a JSON object")
    base = _LENGTH_PREFIX + n
    data_size = size - base
    entries = []
    for name, spec in header.items():
        if name == "__metadata__":
            if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
                raise BadPayload("safetensors __metadata__ must map strings to strings")
            continue
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise BadPayload(f"tensor {name!r}: needs exactly dtype, shape and data_offsets")
        dtype = _TORCH_DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
        shape, offsets = spec["shape"], spec["data_offsets"]
        if dtype is None:
            raise BadPayload(f"tensor {name!r}: unsupported dtype {spec['dtype']!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise BadPayload(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise BadPayload(f"tensor {name!r}: bad data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise BadPayload(f"tensor {name!r}: data_offsets {offsets} outside {data_size} data bytes")
        if end - begin != math.prod(shape) * _itemsize(spec["dtype"]):
            raise BadPayload(f"tensor {name!r}: {end - begin} bytes do not hold shape {shape}")
        entries.append((begin, end, name, dtype, tuple(shape)))
    entries.sort()
    covered = 0
    for begin, end, name, _, _ in entries:
        if begin != covered:
            raise BadPayload(f"tensor {name!r}: data starts at {begin}, expected {covered} (gap or overlap)")
        covered = end
    if covered != data_size:
        raise BadPayload(f"{data_size - covered} bytes after the last tensor")
    return [(name, dtype, shape, base + begin, base + end) for begin, end, name, dtype, shape in entries]


def _view_or_copy(view: memoryview, dtype: torch.dtype, start: int, stop: int) -> torch.Tensor:
    if not view.readonly:
        tensor = torch.frombuffer(view, dtype=dtype, count=(stop - start) // dtype.itemsize, offset=start)
        if tensor.data_ptr() % dtype.itemsize == 0:
            return tensor
    return torch.frombuffer(bytearray(view[start:stop]), dtype=dtype)


def parse(payload: Buffer, manifest: Manifest, device: str | torch.device = "cpu") -> StateDict:
    """Parse safetensors bytes (size bounded by ``manifest``) without checking the contents.

    Tensors view ``payload`` where it is writable and aligned (the buffer a fetch returns: nothing
    copied) and are copied out of it otherwise (``bytes``, odd offsets).
    """
    view = memoryview(payload).cast("B")
    if view.nbytes > manifest.max_payload_bytes:
        raise PayloadTooLarge(f"{view.nbytes} bytes > {manifest.max_payload_bytes}")
    if sys.byteorder != "little":  # safetensors is little-endian: let the library swap
        try:
            return {k: t.to(device) for k, t in safetensors.torch.load(bytes(view)).items()}
        except Exception as exc:  # safetensors raises its own SafetensorError and others
            raise BadPayload(f"not a safetensors payload: {exc}") from None
    state: StateDict = {}
    for name, dtype, shape, start, stop in _layout(view, manifest.max_payload_bytes - manifest.data_bytes):
        if start == stop:  # frombuffer refuses empty buffers
            tensor = torch.empty(shape, dtype=dtype)
        else:
            tensor = _view_or_copy(view, dtype, start, stop).reshape(shape)
        state[name] = tensor if str(device) == "cpu" else tensor.to(device)
    return state


def decode(payload: Buffer, manifest: Manifest, device: str | torch.device = "cpu") -> StateDict:
    """Parse safetensors bytes and validate them against ``manifest``."""
    state = parse(payload, manifest, device)
    validate_state(state, manifest)
    return state


def validate_state(state: Mapping[str, torch.Tensor], manifest: Manifest) -> None:
    """Names, dtypes and shapes equal to the manifest, and every floating value finite."""
    expected = manifest.by_name()
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        raise ManifestMismatch(f"tensor names differ: missing {missing}, unexpected {extra}")
    for name, tensor in state.items():
        spec = expected[name]
        got_dtype = _DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype))
        if got_dtype != spec.dtype:
            raise ManifestMismatch(f"{name}: dtype {got_dtype}, expected {spec.dtype}")
        if tuple(tensor.shape) != spec.shape:
            raise ManifestMismatch(f"{name}: shape {tuple(tensor.shape)}, expected {spec.shape}")
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise NonFiniteModel(f"{name}: contains NaN or Inf")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether no value is NaN or infinite, in one pass without a model-sized temporary.

    The minimum and maximum are NaN when any value is NaN and infinite when any value is; on CPU
    this is ~25x faster than ``torch.isfinite(t).all()`` for a 50M-parameter model.
    """
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
