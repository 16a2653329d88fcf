"""The committed generated gRPC code must be what scripts/gen_proto.py makes from proto/ now."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
FIX = "the committed generated code is stale: run `python scripts/gen_proto.py` and commit the result"


def load_gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    written = load_gen_proto().generate(tmp_path)
    assert written, "gen_proto.generate wrote nothing: is proto/ empty?"
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in written}

    committed_dirs = {rel.parent for rel in fresh}
    committed = {
        p.relative_to(ROOT): p.read_bytes()
        for d in committed_dirs
        for p in (ROOT / d).iterdir()
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    }
    missing = sorted(str(p) for p in set(fresh) - set(committed))
    stale_extra = sorted(str(p) for p in set(committed) - set(fresh))
    differ = sorted(str(p) for p in set(fresh) & set(committed) if fresh[p] != committed[p])
    assert not missing, f"not committed: {missing}; {FIX}"
    assert not stale_extra, f"generated files without a .proto: {stale_extra}; delete them or {FIX}"
    assert not differ, f"differ from proto/: {differ}; {FIX}"
