"""Model payloads as bytes: manifests, digests, chunking, ``ModelChunk`` framing, assembly.

The byte-level half of the wire format, without torch (``mtl_node.wire`` turns bytes into tensors
and back), so that the channel factory and the orchestrator can use the protocol constants and
checks without loading torch. Pure (no grpc import).

Large models make every pass over the bytes count (benchmarks/bench_fetch.py), so the fetch path
touches each byte as few times as it can: the server frames chunks as serialized ``ModelChunk``
messages itself (``frames``, one copy instead of protobuf's three), the client reads each chunk's
data in place in the received message (``split_chunk``), and the assembler hashes while it copies
into the one buffer it returns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import xxhash
from google.protobuf.message import DecodeError

from mtl_node.core.errors import (
    BadPayload,
    DigestMismatch,
    ManifestMismatch,
    PayloadTooLarge,
    TruncatedPayload,
)
from mtl_node.core.protocol import CHUNK_BYTES
from mtl_node.proto.v1 import node_pb2 as pb

FORMAT = "safetensors"
# Room for the safetensors JSON header on top of the raw tensor bytes.
HEADER_SLACK_BYTES = 8 + 4096
HEADER_BYTES_PER_TENSOR = 256


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


_MAX_FIELD = (1 << 29) - 1  # protobuf's largest field number; its tags are 32-bit


def _read_varint(view: memoryview, pos: int, max_bytes: int = 10) -> tuple[int, int]:
    """A varint of at most ``max_bytes``: 10 for values, 5 for tags and lengths, which protobuf
    reads as 32-bit varints and refuses longer (even zero-padded ones: found by tests/fuzz)."""
    result = 0
    for shift in range(0, 7 * max_bytes, 7):
        if pos >= len(view):
            raise BadPayload("chunk message ends inside a varint")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
    raise BadPayload(f"chunk message has a varint longer than {max_bytes} bytes")


def split_chunk(message: bytes) -> tuple[bytes | None, memoryview]:
    """(serialized header or None, data) of one serialized ``ModelChunk``; the data is not copied.

    Reads the protobuf wire format the way protobuf does: unknown fields are skipped, a repeated
    header is merged (serialized messages concatenate into their merge), the last data field wins.
    Each occurrence of a repeated header must parse on its own, as protobuf parses them (their
    concatenation may parse where a piece does not: found by tests/fuzz). Anything malformed is a
    BadPayload.
    """
    view = memoryview(message)
    end = len(view)
    pos = 0
    headers: list[memoryview] = []
    data = view[0:0]
    while pos < end:
        key, pos = _read_varint(view, pos, max_bytes=5)
        field, wire_type = key >> 3, key & 7
        if field == 0 or key >> 32 or field > _MAX_FIELD:
            raise BadPayload(f"chunk message has an invalid field number ({field})")
        if field in (_HEADER_FIELD, _DATA_FIELD) and wire_type != _LEN:
            raise BadPayload(f"chunk field {field} has wire type {wire_type}, expected {_LEN}")
        if wire_type == _LEN:
            length, pos = _read_varint(view, pos, max_bytes=5)
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
    if len(headers) > 1:
        for piece in headers:
            try:
                pb.ModelHeader.FromString(bytes(piece))
            except DecodeError:
                raise BadPayload("chunk message has a header that is not a ModelHeader") from None
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
