"""The copy-light fetch path: hand-framed ModelChunk messages, reading them in place, the hashing
assembler and the zero-copy safetensors parse, each checked against the library it stands in for
(protobuf, safetensors) and against malformed input."""

from __future__ import annotations

import math
import random
import struct

import pytest
import safetensors.torch
import torch
from google.protobuf.message import DecodeError

from mtl_node import wire
from mtl_node.core.errors import BadPayload, DigestMismatch, NonFiniteModel, PayloadTooLarge
from mtl_node.proto.v1 import node_pb2 as pb
from mtl_node.wire import FORMAT, PayloadAssembler, StateDict

HEADER = pb.ModelHeader(round=7, format=FORMAT, total_bytes=10, digest="sha256:ab", agent_id="a")


def payload_of(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# -- frames: what the server sends ----------------------------------------------------------------


@pytest.mark.parametrize(("size", "chunk"), [(1, 4), (10, 3), (12, 4), (3 * (1 << 20) + 5, wire.CHUNK_BYTES)])
def test_frames_are_the_protobuf_serialization(size: int, chunk: int) -> None:
    payload = payload_of(size)
    header = pb.ModelHeader(round=3, format=FORMAT, total_bytes=size, digest=wire.digest(payload))
    got = list(wire.frames(payload, header, chunk))
    expected = [
        pb.ModelChunk(header=header, data=payload[s : s + chunk]).SerializeToString()
        if s == 0
        else pb.ModelChunk(data=payload[s : s + chunk]).SerializeToString()
        for s in range(0, size, chunk)
    ]
    assert got == expected


def test_frames_of_an_empty_payload_carry_the_header() -> None:
    (frame,) = list(wire.frames(b"", HEADER))
    message = pb.ModelChunk.FromString(frame)
    assert message.header == HEADER and message.data == b""


# -- split_chunk: what the client reads -------------------------------------------------------------


def field(number: int, wire_type: int, body: bytes) -> bytes:
    return wire._varint(number << 3 | wire_type) + body


def test_split_reads_header_and_data_without_copying() -> None:
    message = pb.ModelChunk(header=HEADER, data=b"0123456789").SerializeToString()
    raw_header, data = wire.split_chunk(message)
    assert raw_header is not None and pb.ModelHeader.FromString(raw_header) == HEADER
    assert isinstance(data, memoryview) and data.obj is message and bytes(data) == b"0123456789"
    assert wire.split_chunk(pb.ModelChunk(data=b"xy").SerializeToString())[0] is None
    assert wire.split_chunk(b"") == (None, memoryview(b""))


def test_split_follows_protobuf_for_unknown_repeated_and_reordered_fields() -> None:
    first = pb.ModelHeader(round=1, format=FORMAT).SerializeToString()
    second = pb.ModelHeader(total_bytes=5, digest="sha256:cd").SerializeToString()
    message = b"".join(
        [
            field(2, 2, wire._varint(3) + b"old"),
            field(9, 0, wire._varint(300)),  # unknown fields of every wire type
            field(10, 1, b"\x00" * 8),
            field(11, 5, b"\x00" * 4),
            field(12, 2, wire._varint(2) + b"zz"),
            field(1, 2, wire._varint(len(first)) + first),
            field(2, 2, wire._varint(5) + b"hello"),
            field(1, 2, wire._varint(len(second)) + second),
        ]
    )
    want = pb.ModelChunk.FromString(message)
    raw_header, data = wire.split_chunk(message)
    assert raw_header is not None and pb.ModelHeader.FromString(raw_header) == want.header
    assert bytes(data) == want.data == b"hello"


@pytest.mark.parametrize(
    "message",
    [
        b"\x12",  # a tag and nothing else
        b"\x12\xff",  # length varint cut short
        b"\x12\x05abc",  # length past the end
        b"\x12" + b"\xff" * 11,  # varint longer than 10 bytes
        field(2, 0, b"\x01"),  # data as a varint
        field(1, 5, b"\x00" * 4),  # header as fixed32
        field(9, 3, b""),  # group start
        field(9, 1, b"\x00" * 3),  # fixed64 cut short
        field(0, 2, b"\x00"),  # field number 0
    ],
)
def test_split_rejects_malformed_messages(message: bytes) -> None:
    with pytest.raises(BadPayload):
        wire.split_chunk(message)


@pytest.mark.parametrize(
    "message",
    [
        b"b\x00b\x00\x1a" + b"\x80" * 8 + b"\x00",  # unknown field, 9-byte length 0 (tests/fuzz)
        b"\x12" + b"\x80" * 5 + b"\x00",  # data with a 6-byte length 0
        b"\x92" + b"\x80" * 4 + b"\x00\x00",  # data with a 6-byte tag
    ],
)
def test_split_rejects_overlong_tags_and_lengths_like_protobuf(message: bytes) -> None:
    """protobuf reads tags and lengths as varints of at most 5 bytes, zero-padded ones too."""
    with pytest.raises(DecodeError):
        pb.ModelChunk.FromString(message)
    with pytest.raises(BadPayload):
        wire.split_chunk(message)


def test_split_accepts_five_byte_tags_and_lengths_like_protobuf() -> None:
    message = b"\x92\x80\x80\x80\x00" + b"\x82\x80\x80\x80\x00" + b"xy"  # data, 5-byte tag + length
    assert pb.ModelChunk.FromString(message).data == b"xy"
    assert bytes(wire.split_chunk(message)[1]) == b"xy"


def test_split_agrees_with_protobuf_on_mutated_messages() -> None:
    """Property (seeded): whenever both accept a corrupted message, they read the same thing."""
    rng = random.Random(5)
    base = pb.ModelChunk(header=HEADER, data=payload_of(40)).SerializeToString()
    both = 0
    for _ in range(3000):
        message = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            message[rng.randrange(len(message))] = rng.randrange(256)
        message = message[: rng.randint(0, len(message))] if rng.random() < 0.3 else message
        try:
            raw_header, data = wire.split_chunk(bytes(message))
        except BadPayload:
            continue
        try:
            want = pb.ModelChunk.FromString(bytes(message))
            header = pb.ModelHeader.FromString(raw_header) if raw_header is not None else None
        except DecodeError:
            continue
        both += 1
        assert bytes(data) == want.data
        assert (header if header is not None else pb.ModelHeader()) == want.header
    assert both > 100


# -- the assembler ---------------------------------------------------------------------------------


def test_assembler_hashes_as_it_goes_and_hands_over_its_buffer() -> None:
    state = {"w": torch.arange(1000, dtype=torch.float32)}
    payload = wire.encode(state)
    asm = PayloadAssembler(len(payload), wire.digest(payload), FORMAT, wire.manifest_of(state))
    for frame in wire.frames(payload, HEADER, 333):
        asm.add(wire.split_chunk(frame)[1])
    got = asm.finish()
    assert isinstance(got, bytearray) and got == payload


def test_assembler_rejects_a_wrong_digest_and_overflow() -> None:
    payload = wire.encode({"w": torch.ones(4)})
    manifest = wire.manifest_of({"w": torch.ones(4)})
    asm = PayloadAssembler(len(payload), wire.digest(payload[:-1] + b"\x00"), FORMAT, manifest)
    asm.add(memoryview(payload))
    with pytest.raises(DigestMismatch):
        asm.finish()
    asm = PayloadAssembler(len(payload), wire.digest(payload), FORMAT, manifest)
    with pytest.raises(PayloadTooLarge):
        asm.add(payload + b"x")


# -- parse: zero copy, as strict as safetensors ----------------------------------------------------


MIXED: StateDict = {
    "a": torch.randn(3, 5, generator=torch.Generator().manual_seed(1)),
    "b": torch.tensor([1.0, -0.0, 1e300], dtype=torch.float64),
    "h": torch.tensor([1.5, -2.0, 3.0], dtype=torch.float16),
    "bf": torch.tensor([0.5], dtype=torch.bfloat16),
    "i": torch.tensor([-(2**63), 2**63 - 1]),
    "u": torch.tensor([0, 255, 7], dtype=torch.uint8),
    "flag": torch.tensor([True, False, True]),
    "s": torch.tensor(2.5),
    "e": torch.zeros(0, 3),
}


def bitwise(a: torch.Tensor) -> bytes:
    return a.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_encode_writes_what_the_safetensors_library_reads() -> None:
    state = {**MIXED, "ünïcode.name": torch.ones(2, 2), "t": torch.arange(12.0).reshape(3, 4).t()}
    payload = wire.encode(state)
    header_length = struct.unpack("<Q", payload[:8])[0]
    assert (8 + header_length) % 8 == 0  # tensor data starts aligned
    got = safetensors.torch.load(payload)
    assert set(got) == set(state)
    for name, tensor in state.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert bitwise(got[name]) == bitwise(tensor), name
        start = wire.parse(bytearray(payload), wire.manifest_of(state))[name]
        assert start.numel() == 0 or start.data_ptr() % tensor.element_size() == 0, name


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_parse_equals_the_safetensors_library(kind: type) -> None:
    payload = wire.encode(MIXED)
    want = safetensors.torch.load(payload)
    got = wire.parse(
        kind(bytearray(payload)) if kind is memoryview else kind(payload), wire.manifest_of(MIXED)
    )
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert bitwise(got[name]) == bitwise(want[name]), name


def test_parse_views_a_writable_buffer_and_copies_a_read_only_one() -> None:
    state = {"w": torch.arange(6, dtype=torch.float64)}
    payload = bytearray(wire.encode(state))
    viewed = wire.parse(payload, wire.manifest_of(state))["w"]
    copied = wire.parse(bytes(payload), wire.manifest_of(state))["w"]
    payload[-8:] = struct.pack("<d", 42.0)  # the last element's bytes
    assert viewed[-1].item() == 42.0  # shares the received buffer: no copy was made
    assert copied[-1].item() == 5.0


def test_parse_copies_misaligned_tensors() -> None:
    state = {"w": torch.arange(3, dtype=torch.float64)}
    payload = wire.encode(state)
    shifted = memoryview(bytearray(b"x" + payload))[1:]  # the data now starts at an odd address
    got = wire.parse(shifted, wire.manifest_of(state))["w"]
    assert got.data_ptr() % 8 == 0 and torch.equal(got, state["w"])


def safetensors_bytes(header: object, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else __import__("json").dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01\x00\x00",
        struct.pack("<Q", 1000) + b"{}",  # header longer than the payload
        safetensors_bytes(b"{not json", b""),
        safetensors_bytes(b"\xff\xfe", b""),
        safetensors_bytes([1, 2]),
        safetensors_bytes({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)),
        safetensors_bytes({"w": {**F32, "dtype": "C64"}}, bytes(8)),
        safetensors_bytes({"w": {**F32, "dtype": 3}}, bytes(8)),
        safetensors_bytes({"w": {**F32, "shape": [-2]}}, bytes(8)),
        safetensors_bytes({"w": {**F32, "shape": [2.0]}}, bytes(8)),
        safetensors_bytes({"w": {**F32, "data_offsets": [0, 16]}}, bytes(8)),
        safetensors_bytes({"w": {**F32, "data_offsets": [4, 0]}}, bytes(8)),
        safetensors_bytes({"w": {**F32, "shape": [3]}}, bytes(8)),
        safetensors_bytes({"w": F32}, bytes(12)),  # trailing bytes
        safetensors_bytes({"w": {**F32, "data_offsets": [4, 12]}}, bytes(12)),  # a gap
        safetensors_bytes({"w": F32, "v": {**F32, "data_offsets": [4, 12]}}, bytes(12)),  # overlap
        safetensors_bytes({"__metadata__": {"k": 1}, "w": F32}, bytes(8)),
        safetensors_bytes({"w": {**F32, "extra": 1}}, bytes(8)),
    ],
)
def test_parse_rejects_malformed_safetensors(payload: bytes) -> None:
    manifest = wire.Manifest((wire.TensorSpec("w", "F32", (2,)),))
    for kind in (bytes, bytearray):
        with pytest.raises(BadPayload):
            wire.parse(kind(payload), manifest)


def test_parse_bounds_the_header_by_the_manifest() -> None:
    manifest = wire.Manifest((wire.TensorSpec("w", "F32", (2,)),))
    metadata = {"pad": "x" * (manifest.max_payload_bytes - manifest.data_bytes)}
    with pytest.raises((BadPayload, PayloadTooLarge)):
        wire.parse(safetensors_bytes({"__metadata__": metadata, "w": F32}, bytes(8)), manifest)


def test_parse_agrees_with_safetensors_on_mutated_payloads() -> None:
    """Property (seeded): a corrupted payload parse accepts, safetensors accepts too, same tensors."""
    rng = random.Random(11)
    base = wire.encode(MIXED)
    manifest = wire.manifest_of(MIXED)
    header_end = 8 + struct.unpack("<Q", base[:8])[0]
    both = 0
    for _ in range(1500):
        payload = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            payload[rng.randrange(header_end)] = rng.randrange(32, 127)
        try:
            got = wire.parse(payload, manifest)
        except BadPayload:
            continue
        want = safetensors.torch.load(bytes(payload))  # never more lenient than the library
        both += 1
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
            assert bitwise(got[name]) == bitwise(want[name])
    assert both > 5


# -- finiteness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_non_finite_value_is_found(dtype: torch.dtype, bad: float) -> None:
    for n in (1, 17, 4099):
        for where in (0, n // 2, n - 1):
            t = torch.rand(n).to(dtype)
            t[where] = bad
            with pytest.raises(NonFiniteModel):
                wire.validate_state({"w": t}, wire.manifest_of({"w": t}))
    fine = {
        "w": torch.rand(5).to(dtype),
        "e": torch.zeros(0, dtype=dtype),
        "s": torch.tensor(1.0, dtype=dtype),
    }
    wire.validate_state(fine, wire.manifest_of(fine))
