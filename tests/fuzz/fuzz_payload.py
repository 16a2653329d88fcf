"""Coverage-guided fuzzing (atheris) of everything a received model goes through: a GetModel
response stream's chunks (framing.split_chunk, the ModelHeader inside), payload assembly against
the announced size and digest, and the safetensors parser and validation (wire.decode).

The property: for any bytes, the parser either returns a model that validates or raises the
project's WireError (or protobuf's DecodeError for the header, which the client turns into one);
anything else (another exception, a crash, a hang) is a finding. A payload it accepts must also be
accepted by the safetensors library, with the same tensors.

    python tests/fuzz/fuzz_payload.py -max_total_time=60 [corpus_dir]   (see tests/fuzz/run.sh)
"""

from __future__ import annotations

import sys

import atheris
import safetensors.torch  # the reference and torch itself: not instrumented (minutes to do)
import torch
from google.protobuf.message import DecodeError

with atheris.instrument_imports(include=["mtl_node"]):
    from mtl_node import framing, wire
    from mtl_node.core.errors import WireError
    from mtl_node.proto.v1 import node_pb2 as pb

# A small model like the one agents exchange: what received payloads are checked against.
MODEL = {"w": torch.zeros(4, 3), "b": torch.zeros(3), "steps": torch.zeros((), dtype=torch.int64)}
MANIFEST = wire.manifest_of(MODEL)
SEED = wire.encode({"w": torch.randn(4, 3), "b": torch.randn(3), "steps": torch.tensor(7)})


def check_payload(payload: bytes) -> None:
    try:
        state = wire.decode(bytearray(payload), MANIFEST)
    except WireError:
        return
    ref = safetensors.torch.load(payload)  # must accept what we accepted
    assert set(ref) == set(state), (sorted(ref), sorted(state))
    for name, tensor in state.items():
        assert torch.equal(ref[name], tensor), name


def check_chunk(message: bytes) -> None:
    """What the client does with one GetModel response (mtl_node.client._chunk_parts)."""
    try:
        raw_header, data = framing.split_chunk(message)
    except WireError:
        return
    header = None
    if raw_header is not None:
        try:
            header = pb.ModelHeader.FromString(raw_header)
        except DecodeError:
            return  # the client rejects the chunk (BadPayload)
    pb.ModelChunk.FromString(message)  # so protobuf must accept what the client accepts
    if header is not None:
        try:
            assembler = framing.PayloadAssembler(header.total_bytes, header.digest, header.format, MANIFEST)
            assembler.add(data)
            check_payload(bytes(assembler.finish()))
        except WireError:
            return


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    if mode == 0:
        check_payload(rest)
    elif mode == 1:
        check_chunk(rest)
    else:  # mutations of a valid payload reach deeper than random bytes
        payload = bytearray(SEED)
        for k in range(0, len(rest) - 1, 2):
            payload[rest[k] * 7 % len(payload)] = rest[k + 1]
        check_payload(bytes(payload))


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
