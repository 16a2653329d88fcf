"""Regenerate mtl_node/proto/v1/*_pb2*.py from proto/ (run after editing a .proto file).

The generated code is committed so that installing the package never needs grpcio-tools;
tests/unit/test_proto_fresh.py fails when the committed code is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto under proto/ into out_dir; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written: list[Path] = []
    for proto in protos:
        stem = proto.removesuffix(".proto")
        written += [
            out_dir / f"{stem}_pb2.py",
            out_dir / f"{stem}_pb2.pyi",
            out_dir / f"{stem}_pb2_grpc.py",
        ]
    return written


if __name__ == "__main__":
    written = generate(ROOT)
    for path in written:
        print(path.relative_to(ROOT))
    sys.exit(0)
