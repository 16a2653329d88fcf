"""Property tests (hypothesis) for everything that parses bytes from the network or files from users:
the safetensors codec (against the safetensors library), ModelChunk framing (against protobuf),
payload assembly, and the config and topology loaders. Whatever the input, the only outcomes are a
correct result or the project's own error; nothing the reference library rejects is accepted."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtl_node import framing, wire
from mtl_node.config import build_config, load_yaml
from mtl_node.core.errors import ConfigError, WireError
from mtl_node.proto.v1 import node_pb2 as pb
from orchestrator.spec import load_topology

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8]
NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz._0123456789", min_size=1, max_size=12).filter(
    lambda n: n != "__metadata__"  # reserved by safetensors; wire.encode refuses it
)


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    out = {}
    for name in names:
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=g).to(dtype)
        else:
            t = torch.randint(0, 100, shape, generator=g).to(dtype)
        out[name] = t
    return out


def reference(payload: bytes) -> dict[str, torch.Tensor] | None:
    """What the safetensors library makes of ``payload``, or None when it rejects it."""
    try:
        return safetensors.torch.load(payload)
    except Exception:
        return None


def permissive(payload: bytes) -> wire.Manifest:
    """A manifest that bounds nothing the property is about (size checks aside)."""
    return wire.Manifest((framing.TensorSpec("x", "U8", (len(payload),)),))


@SETTINGS
@given(state_dicts())
def test_encode_then_parse_is_identity_and_the_library_agrees(state: dict[str, torch.Tensor]) -> None:
    payload = wire.encode(state)
    manifest = wire.manifest_of(state)
    got = wire.parse(bytearray(payload), manifest)
    ref = reference(payload)
    assert ref is not None
    assert set(got) == set(state) == set(ref)
    for name, t in state.items():
        assert torch.equal(got[name], t) and torch.equal(ref[name], t)


@SETTINGS
@given(state_dicts(), st.data())
def test_a_mutated_payload_is_never_accepted_when_the_library_rejects_it(
    state: dict[str, torch.Tensor], data: st.DataObject
) -> None:
    payload = bytearray(wire.encode(state))
    edits = data.draw(
        st.lists(st.tuples(st.integers(0, max(len(payload) - 1, 0)), st.integers(0, 255)), max_size=4)
    )
    for pos, value in edits:
        if payload:
            payload[pos] = value
    cut = data.draw(st.integers(0, len(payload)))
    if data.draw(st.booleans()):
        payload = payload[:cut]
    mutated = bytes(payload)
    try:
        got = wire.parse(bytearray(mutated), permissive(mutated))
    except WireError:
        return
    ref = reference(mutated)
    assert ref is not None, "accepted a payload the safetensors library rejects"
    assert set(got) == set(ref)
    for name in got:
        assert got[name].dtype == ref[name].dtype and got[name].shape == ref[name].shape
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), ref[name].reshape(-1).view(torch.uint8))


@SETTINGS
@given(st.binary(max_size=512))
def test_random_bytes_parse_only_as_the_library_would(payload: bytes) -> None:
    try:
        got = wire.parse(bytearray(payload), permissive(payload))
    except WireError:
        return
    assert reference(payload) is not None
    assert isinstance(got, dict)


@st.composite
def safetensors_headers(draw: st.DrawFn) -> bytes:
    """Well-framed payloads with hostile JSON headers: the parser's checks, not its framing."""
    header: dict[str, object] = {}
    for name in draw(st.lists(NAMES, max_size=3, unique=True)):
        header[name] = {
            "dtype": draw(st.sampled_from(["F32", "F64", "I8", "U8", "BOOL", "F8_E4M3", "X", 3])),
            "shape": draw(st.lists(st.integers(-2, 4), max_size=3)),
            "data_offsets": draw(st.lists(st.integers(-4, 40), min_size=0, max_size=3)),
        }
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(NAMES, st.one_of(st.text(max_size=3), st.integers())))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = draw(st.binary(max_size=48))
    return len(text).to_bytes(8, "little") + text + data


@SETTINGS
@given(safetensors_headers())
def test_hostile_headers_are_judged_as_the_library_judges_them(payload: bytes) -> None:
    ref = reference(payload)
    try:
        got = wire.parse(bytearray(payload), permissive(payload))
    except WireError:
        return
    assert ref is not None, f"accepted what safetensors rejects: {payload[:200]!r}"
    assert set(got) == set(ref)


@st.composite
def headers(draw: st.DrawFn) -> pb.ModelHeader:
    return pb.ModelHeader(
        round=draw(st.integers(0, 2**64 - 1)),
        format=draw(st.text(max_size=12)),
        total_bytes=draw(st.integers(0, 2**64 - 1)),
        digest=draw(st.text(max_size=40)),
        agent_id=draw(st.text(max_size=12)),
    )


@SETTINGS
@given(st.binary(max_size=3000), headers(), st.integers(1, 1024))
def test_frames_are_protobuf_messages_and_split_back(
    payload: bytes, header: pb.ModelHeader, size: int
) -> None:
    rebuilt = bytearray()
    pieces = [payload[i : i + size] for i in range(0, max(len(payload), 1), size)]
    for index, frame in enumerate(framing.frames(payload, header, chunk_bytes=size)):
        # The same message protobuf would make (its serialization may leave out an empty field).
        expected = pb.ModelChunk(data=pieces[index])
        if index == 0:
            expected.header.CopyFrom(header)
        assert pb.ModelChunk.FromString(frame) == expected
        raw_header, data = framing.split_chunk(frame)
        assert (raw_header is not None) == (index == 0)
        if raw_header is not None:
            assert pb.ModelHeader.FromString(raw_header) == header
        rebuilt += data
    assert bytes(rebuilt) == payload


@SETTINGS
@given(st.binary(max_size=300))
def test_split_chunk_accepts_only_what_protobuf_accepts(message: bytes) -> None:
    try:
        parsed = pb.ModelChunk.FromString(message)
    except DecodeError:
        parsed = None
    try:
        raw_header, data = framing.split_chunk(message)
    except WireError:
        return
    assert parsed is not None, f"split_chunk accepted what protobuf rejects: {message!r}"
    assert bytes(data) == parsed.data
    if raw_header is None:
        assert not parsed.HasField("header")
    else:
        try:
            assert pb.ModelHeader.FromString(raw_header) == parsed.header
        except DecodeError:
            pytest.fail("split_chunk gave a header protobuf cannot parse, though it parsed the chunk")


@SETTINGS
@given(
    st.binary(min_size=1, max_size=4000),
    st.lists(st.integers(1, 700), min_size=1, max_size=20),
    st.booleans(),
)
def test_the_assembler_takes_any_chunking_and_rejects_a_wrong_digest(
    payload: bytes, sizes: list[int], corrupt: bool
) -> None:
    manifest = permissive(payload)
    digest = framing.digest(payload)
    if corrupt:
        digest = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    assembler = framing.PayloadAssembler(len(payload), digest, wire.FORMAT, manifest)
    pos, k = 0, 0
    while pos < len(payload):
        step = sizes[k % len(sizes)]
        assembler.add(payload[pos : pos + step])
        pos += step
        k += 1
    if corrupt:
        with pytest.raises(WireError):
            assembler.finish()
    else:
        assert bytes(assembler.finish()) == payload


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    ["id", "listen", "neighbors", "rule", "rounds", "fetch_timeout", "limits", "seed", "task"]
)


@SETTINGS
@given(st.dictionaries(FIELDS, JSONISH, max_size=5))
def test_agent_configs_are_valid_or_a_config_error(data: dict[str, object]) -> None:
    with contextlib.suppress(ConfigError):
        build_config({"id": "a", **data})


@SETTINGS
@given(st.binary(max_size=400))
def test_config_files_of_any_bytes_load_or_fail_clearly(
    tmp_path_factory: pytest.TempPathFactory, raw: bytes
) -> None:
    for suffix in (".yaml", ".json"):
        path = Path(tmp_path_factory.mktemp("cfg")) / f"c{suffix}"
        path.write_bytes(raw)
        with contextlib.suppress(ConfigError):
            load_yaml(path)


@SETTINGS
@given(st.one_of(st.binary(max_size=400), st.text(max_size=400).map(str.encode)))
def test_topology_files_of_any_bytes_load_or_fail_clearly(
    tmp_path_factory: pytest.TempPathFactory, raw: bytes
) -> None:
    path = Path(tmp_path_factory.mktemp("topo")) / "t.yaml"
    path.write_bytes(raw)
    with contextlib.suppress(ConfigError):
        load_topology(path)


def test_deep_nesting_is_a_config_error(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    for name in ("c.yaml", "c.json"):
        path = tmp_path / name
        path.write_text(deep)
        with pytest.raises(ConfigError):
            load_yaml(path)
    path = tmp_path / "t.yaml"
    path.write_text(deep)
    with pytest.raises(ConfigError):
        load_topology(path)
