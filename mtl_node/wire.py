"""Model <-> bytes: safetensors payloads, ~1 MiB chunks, and validation of what arrives.

Pure (no grpc import) so it can be round-trip tested on its own. The payload format is safetensors:
a JSON header plus raw little-endian tensor bytes; nothing received is ever unpickled. A received
payload is checked against the local model's manifest before it is trusted: byte total bounded
before allocation, digest, tensor names, dtypes, shapes, and finite values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import safetensors.torch
import torch

from mtl_node.errors import (
    BadPayload,
    DigestMismatch,
    ManifestMismatch,
    NonFiniteModel,
    PayloadTooLarge,
    TruncatedPayload,
)

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
    """Serialize a state dict to safetensors bytes (tensors moved to CPU, made contiguous)."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    return safetensors.torch.save(cpu)


def digest(payload: bytes | bytearray | memoryview) -> str:
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def chunks(payload: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Slices of ``payload`` of at most ``chunk_bytes`` (at least one, even for empty payloads)."""
    view = memoryview(payload)
    if not view:
        yield b""
        return
    for start in range(0, len(view), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


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
    """Collects streamed chunks into one buffer, enforcing the announced size and digest."""

    def __init__(self, total_bytes: int, expected_digest: str, fmt: str, manifest: Manifest):
        check_header(total_bytes, fmt, manifest)
        self.total_bytes = total_bytes
        self.expected_digest = expected_digest
        self._buffer = bytearray(total_bytes)
        self._filled = 0

    def add(self, data: bytes) -> None:
        end = self._filled + len(data)
        if end > self.total_bytes:
            raise PayloadTooLarge(f"received more than the announced {self.total_bytes} bytes")
        self._buffer[self._filled : end] = data
        self._filled = end

    def finish(self) -> bytes:
        if self._filled != self.total_bytes:
            raise TruncatedPayload(f"received {self._filled} of {self.total_bytes} bytes")
        if digest(self._buffer) != self.expected_digest:
            raise DigestMismatch("payload digest does not match the header")
        return bytes(self._buffer)


def parse(payload: bytes, manifest: Manifest, device: str | torch.device = "cpu") -> StateDict:
    """Parse safetensors bytes (size bounded by ``manifest``) without checking the contents."""
    if len(payload) > manifest.max_payload_bytes:
        raise PayloadTooLarge(f"{len(payload)} bytes > {manifest.max_payload_bytes}")
    try:
        state = safetensors.torch.load(payload)
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise BadPayload(f"not a safetensors payload: {exc}") from None
    if str(device) != "cpu":
        state = {name: t.to(device) for name, t in state.items()}
    return state


def decode(payload: bytes, manifest: Manifest, device: str | torch.device = "cpu") -> StateDict:
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
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteModel(f"{name}: contains NaN or Inf")
