"""The wire codec: safetensors round trips, chunking, and every way a received payload is rejected."""

from __future__ import annotations

import io
import json
import pickle
import random
import struct

import pytest
import torch

from mtl_node import wire
from mtl_node.core.errors import (
    BadPayload,
    DigestMismatch,
    ManifestMismatch,
    NonFiniteModel,
    PayloadTooLarge,
    TruncatedPayload,
    WireError,
)
from mtl_node.wire import FORMAT, Manifest, PayloadAssembler, StateDict, TensorSpec

UNPICKLED: list[str] = []


def _unpickled_marker() -> dict[str, str]:
    UNPICKLED.append("a pickle payload was unpickled")
    return {}


class Booby:
    """Unpickling this calls ``_unpickled_marker``: proof of whether anything unpickled it."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_unpickled_marker, ())


def raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's memory, for bitwise comparison (NaN payloads and -0.0 included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bitwise_equal(a: StateDict, b: StateDict) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert tuple(a[name].shape) == tuple(b[name].shape), name
        assert raw_bytes(a[name]) == raw_bytes(b[name]), name


def send_and_receive(state: StateDict, chunk_bytes: int = wire.CHUNK_BYTES) -> tuple[StateDict, int]:
    """What a server and client do: encode, chunk, reassemble, verify, decode."""
    manifest = wire.manifest_of(state)
    payload = wire.encode(state)
    assembler = PayloadAssembler(len(payload), wire.digest(payload), FORMAT, manifest)
    n = 0
    for chunk in wire.chunks(payload, chunk_bytes):
        assert len(chunk) <= chunk_bytes
        assembler.add(chunk)
        n += 1
    return wire.decode(assembler.finish(), manifest), n


def small_model() -> StateDict:
    return {"w": torch.tensor([1.0, -2.0, 3.5]), "b": torch.tensor(0.25)}


# -- round trips ------------------------------------------------------------------------------------

SAMPLES: dict[str, StateDict] = {
    "float32": {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(1))},
    "float64": {"w": torch.tensor([1e-300, -0.0, 1e300, 3.141592653589793], dtype=torch.float64)},
    "int64": {"idx": torch.tensor([-(2**63), 0, 2**63 - 1]), "w": torch.ones(2)},
    "scalar": {"s": torch.tensor(2.5, dtype=torch.float64)},
    "empty": {"e": torch.zeros(0), "e2": torch.zeros(0, 3, dtype=torch.float64), "x": torch.ones(1)},
    "mixed": {
        "h": torch.tensor([1.5, -2.0], dtype=torch.float16),
        "bf": torch.tensor([0.5, 8.0], dtype=torch.bfloat16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "flag": torch.tensor([True, False]),
        "i32": torch.tensor([[1, 2], [3, 4]], dtype=torch.int32),
    },
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip_is_bitwise_equal(name: str) -> None:
    state = SAMPLES[name]
    got, n = send_and_receive(state)
    assert n == 1
    assert_bitwise_equal(got, state)


def test_round_trip_of_a_3_mib_tensor_spans_several_chunks() -> None:
    g = torch.Generator().manual_seed(7)
    state = {"big": torch.randn(3 * (1 << 20) // 4, generator=g), "bias": torch.randn(10, generator=g)}
    payload = wire.encode(state)
    assert len(payload) > 3 * (1 << 20)
    got, n = send_and_receive(state)
    assert n == -(-len(payload) // wire.CHUNK_BYTES) >= 4
    assert_bitwise_equal(got, state)


def test_round_trip_with_uneven_small_chunks() -> None:
    state = SAMPLES["mixed"]
    got, n = send_and_receive(state, chunk_bytes=7)
    assert n > 10
    assert_bitwise_equal(got, state)


def test_random_round_trips() -> None:
    """Property (seeded, so a failure reproduces): random dtypes and shapes survive the wire."""
    rng = random.Random(99)
    dtypes = [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.uint8,
    ]
    for _ in range(40):
        state: StateDict = {}
        for j in range(rng.randint(1, 4)):
            shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 3)))
            dtype = rng.choice(dtypes)
            g = torch.Generator().manual_seed(rng.randrange(2**31))
            if dtype.is_floating_point:
                t = (torch.randn(shape, generator=g) * 100).to(dtype)
            else:
                t = torch.randint(0, 200, shape, generator=g).to(dtype)
            state[f"t{j}.{rng.choice(['weight', 'bias'])}"] = t
        got, _ = send_and_receive(state, chunk_bytes=rng.choice([1, 13, 64, wire.CHUNK_BYTES]))
        assert_bitwise_equal(got, state)
        assert len(wire.encode(state)) <= wire.manifest_of(state).max_payload_bytes


def test_non_contiguous_tensors_are_encoded() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert not t.is_contiguous()
    got, _ = send_and_receive({"t": t})
    assert torch.equal(got["t"], t)


def test_chunks_of_an_empty_payload_is_one_empty_chunk() -> None:
    assert list(wire.chunks(b"")) == [b""]
    assert b"".join(wire.chunks(b"abcdefghij", 3)) == b"abcdefghij"
    assert [len(c) for c in wire.chunks(b"abcdefghij", 3)] == [3, 3, 3, 1]


# -- manifest ---------------------------------------------------------------------------------------


def test_manifest_of_lists_sorted_specs_and_byte_counts() -> None:
    state = {
        "z": torch.zeros(2, 3, dtype=torch.float64),
        "a": torch.zeros(5, dtype=torch.int32),
        "m": torch.tensor(1.0, dtype=torch.float16),
    }
    m = wire.manifest_of(state)
    assert m.tensors == (
        TensorSpec("a", "I32", (5,)),
        TensorSpec("m", "F16", ()),
        TensorSpec("z", "F64", (2, 3)),
    )
    assert [t.nbytes for t in m.tensors] == [20, 2, 48]
    assert m.data_bytes == 70 == sum(t.numel() * t.element_size() for t in state.values())
    assert m.max_payload_bytes >= len(wire.encode(state)) > m.data_bytes
    assert m.by_name()["z"].shape == (2, 3)


def test_manifest_rejects_unsupported_dtypes() -> None:
    with pytest.raises(ValueError, match="cannot be sent"):
        wire.manifest_of({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ManifestMismatch):
        _ = TensorSpec("x", "C64", (2,)).nbytes


def test_max_payload_bytes_bounds_many_tensors_with_long_names() -> None:
    state = {f"layer{i:03d}." + "x" * 150: torch.zeros(i % 3) for i in range(200)}
    assert len(wire.encode(state)) <= wire.manifest_of(state).max_payload_bytes


# -- rejections -------------------------------------------------------------------------------------


def assembler_for(state: StateDict) -> tuple[bytes, PayloadAssembler]:
    payload = wire.encode(state)
    return payload, PayloadAssembler(len(payload), wire.digest(payload), FORMAT, wire.manifest_of(state))


def test_digest_mismatch() -> None:
    state = small_model()
    payload = wire.encode(state)
    asm = PayloadAssembler(len(payload), wire.digest(payload), FORMAT, wire.manifest_of(state))
    tampered = bytearray(payload)
    tampered[-1] ^= 0x01
    asm.add(bytes(tampered))
    with pytest.raises(DigestMismatch):
        asm.finish()


def test_truncated_stream() -> None:
    payload, asm = assembler_for(small_model())
    asm.add(payload[:-5])
    with pytest.raises(TruncatedPayload):
        asm.finish()


def test_announced_total_below_the_manifest_is_truncated() -> None:
    state = small_model()
    with pytest.raises(TruncatedPayload):
        PayloadAssembler(3, "sha256:00", FORMAT, wire.manifest_of(state))


def test_oversized_announced_total_is_rejected_before_allocating() -> None:
    manifest = wire.manifest_of(small_model())
    # 2**62 bytes could never be allocated: getting PayloadTooLarge (not MemoryError) shows the
    # check runs first.
    with pytest.raises(PayloadTooLarge):
        PayloadAssembler(2**62, "sha256:00", FORMAT, manifest)
    with pytest.raises(PayloadTooLarge):
        PayloadAssembler(manifest.max_payload_bytes + 1, "sha256:00", FORMAT, manifest)
    PayloadAssembler(manifest.max_payload_bytes, "sha256:00", FORMAT, manifest)  # the bound itself is fine


def test_more_bytes_than_announced() -> None:
    payload, asm = assembler_for(small_model())
    asm.add(payload)
    with pytest.raises(PayloadTooLarge):
        asm.add(b"x")


def test_decode_bounds_the_payload_size() -> None:
    state = small_model()
    manifest = wire.manifest_of(state)
    with pytest.raises(PayloadTooLarge):
        wire.decode(b"\0" * (manifest.max_payload_bytes + 1), manifest)


@pytest.mark.parametrize("fmt", ["pickle", "torch", "", "SAFETENSORS"])
def test_wrong_format_string(fmt: str) -> None:
    payload = wire.encode(small_model())
    with pytest.raises(BadPayload):
        PayloadAssembler(len(payload), wire.digest(payload), fmt, wire.manifest_of(small_model()))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"garbage" * 10,
        struct.pack("<Q", 10**12) + b"{}",  # header length far beyond the payload
        struct.pack("<Q", 5) + b"nojsn" + b"\0" * 40,
        struct.pack("<Q", 2) + b"[]" + b"\0" * 40,
    ],
)
def test_garbage_bytes_are_bad_payloads(payload: bytes) -> None:
    with pytest.raises(BadPayload):
        wire.decode(payload, wire.manifest_of(small_model()))


def test_safetensors_header_lying_about_offsets() -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4000]}}).encode()
    payload = struct.pack("<Q", len(header)) + header + b"\0" * 12
    with pytest.raises(BadPayload):
        wire.decode(payload, wire.manifest_of({"w": torch.zeros(3)}))


def test_pickle_payloads_are_rejected_and_never_unpickled() -> None:
    manifest = wire.manifest_of(small_model())
    UNPICKLED.clear()
    evil = pickle.dumps({"w": Booby(), "b": Booby()})
    assert pickle.loads(evil) == {"w": {}, "b": {}} and UNPICKLED  # the trap works when unpickled
    UNPICKLED.clear()
    with pytest.raises(BadPayload):
        wire.decode(evil, manifest)
    with pytest.raises(BadPayload):
        wire.decode(pickle.dumps({"w": [1.0, -2.0, 3.5], "b": 0.25}), manifest)
    buf = io.BytesIO()
    torch.save({"w": Booby()}, buf)  # torch's zip+pickle checkpoint format
    with pytest.raises(BadPayload):
        wire.decode(buf.getvalue(), manifest)
    assert UNPICKLED == []


def test_wrong_tensor_name() -> None:
    manifest = wire.manifest_of(small_model())
    for state in (
        {"w": torch.zeros(3), "c": torch.tensor(0.0)},  # renamed
        {"w": torch.zeros(3)},  # missing
        {**small_model(), "extra": torch.zeros(1)},  # unexpected
    ):
        with pytest.raises(ManifestMismatch, match="names"):
            wire.decode(wire.encode(state), manifest)


def test_wrong_dtype() -> None:
    manifest = wire.manifest_of(small_model())
    state = {"w": torch.zeros(3, dtype=torch.float64), "b": torch.tensor(0.0)}
    with pytest.raises(ManifestMismatch, match="dtype"):
        wire.decode(wire.encode(state), manifest)


@pytest.mark.parametrize("shape", [(4,), (3, 1), (1, 3), ()])
def test_wrong_shape(shape: tuple[int, ...]) -> None:
    manifest = wire.manifest_of(small_model())
    state = {"w": torch.zeros(shape), "b": torch.tensor(0.0)}
    with pytest.raises(ManifestMismatch, match="shape"):
        wire.decode(wire.encode(state), manifest)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_non_finite_values(bad: float, dtype: torch.dtype) -> None:
    good = {"w": torch.zeros(2, 2, dtype=dtype), "n": torch.tensor([1, 2])}
    manifest = wire.manifest_of(good)
    state = {"w": torch.tensor([[0.0, 1.0], [bad, 2.0]], dtype=dtype), "n": torch.tensor([1, 2])}
    with pytest.raises(NonFiniteModel):
        wire.decode(wire.encode(state), manifest)
    with pytest.raises(NonFiniteModel):
        wire.validate_state(state, manifest)


def test_integer_tensors_are_not_checked_for_finiteness() -> None:
    state = {"n": torch.tensor([torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min])}
    wire.validate_state(state, wire.manifest_of(state))


def test_every_rejection_is_a_wire_error_with_a_reason_tag() -> None:
    tags = {
        PayloadTooLarge: "oversized",
        TruncatedPayload: "truncated",
        DigestMismatch: "digest",
        ManifestMismatch: "manifest",
        NonFiniteModel: "non-finite",
        BadPayload: "format",
    }
    for cls, tag in tags.items():
        assert issubclass(cls, WireError)
        assert cls.reason == tag


def test_a_hand_written_manifest_matches_manifest_of() -> None:
    state = {"w": torch.zeros(2, dtype=torch.float64)}
    assert wire.manifest_of(state) == Manifest((TensorSpec("w", "F64", (2,)),))
