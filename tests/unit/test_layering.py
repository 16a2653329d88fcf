"""The layering at run time: what must not load torch does not (import-linter checks the import graph;
this checks what a fresh interpreter actually loads, dynamic imports included)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# (module, modules it must not load)
TORCH_FREE = [
    "mtl_node.core.errors",
    "mtl_node.core.names",
    "mtl_node.core.protocol",
    "mtl_node.core.ids",
    "mtl_node.core.registry",
    "mtl_node.framing",
    "mtl_node.channel",
    "mtl_node.aggregation",
    "orchestrator.cli",
    "orchestrator.spec",
    "orchestrator.planner",
    "orchestrator.render",
    "orchestrator.report",
    "orchestrator.runner",
    "orchestrator.backends",
    "orchestrator.backends.docker",
    "orchestrator.backends.k8s",
    "orchestrator.backends.local",
    "orchestrator.backends.ssh",
    "orchestrator.backends.sim",
    "orchestrator.sweep.spec",
    "orchestrator.sweep.runner",
    "orchestrator.sweep.executors",
    "orchestrator.sweep.report",
    "orchestrator.sweep.cell",
    "orchestrator.tls",  # mtl-orchestrate certs
    "mtl_node.identity",
    "mtl_node.ca",  # mtl-orchestrate certs
    "mtl_node.auth",
]


def _loaded(code: str) -> set[str]:
    """Top-level packages a fresh interpreter has loaded after running ``code``."""
    probe = code + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return set(out.stdout.split())


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_no_torch(module: str) -> None:
    loaded = _loaded(f"import {module}")
    assert "torch" not in loaded, f"importing {module} loads torch"


@pytest.mark.parametrize("module", ["mtl_node.core.names", "mtl_node.aggregation", "mtl_node.framing"])
def test_module_imports_no_grpc(module: str) -> None:
    assert "grpc" not in _loaded(f"import {module}"), f"importing {module} loads grpc"


def test_planning_every_example_loads_no_torch() -> None:
    code = textwrap.dedent(
        """
        from pathlib import Path
        from orchestrator.planner import plan_topology
        from orchestrator.render import render
        from orchestrator.spec import load_topology
        for path in sorted(p for p in Path("examples").glob("*.yaml") if not p.name.startswith("sweep-")):
            plan = plan_topology(load_topology(path))
        """
    )
    assert "torch" not in _loaded(code)


def test_up_with_a_bad_topology_fails_before_torch(tmp_path: Path) -> None:
    """``mtl-orchestrate up`` reads and validates the YAML before anything loads torch, so a typo
    costs no torch import: exit 2, one line naming the field, torch never loaded."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntask: target-localization\nrule: loss-filterd\nagents: 3\n")
    out_dir = tmp_path / "out"
    code = textwrap.dedent(
        f"""
        import atexit, sys
        atexit.register(lambda: print("TORCH_LOADED" if "torch" in sys.modules else "TORCH_FREE"))
        sys.argv = ["mtl-orchestrate", "up", {str(bad)!r}, "--backend", "sim", "--out", {str(out_dir)!r}]
        from orchestrator.cli import main
        main()
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "rule" in out.stderr and "loss-filtered" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout.strip().endswith("TORCH_FREE"), out.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["certs", "examples/quickstart.yaml", "--out", "{tmp}/certs"],
        ["render", "examples/quickstart.yaml", "--format", "k8s", "--out", "{tmp}/k8s"],
    ],
    ids=["certs", "render"],
)
def test_certs_and_render_run_without_torch(argv: list[str], tmp_path: Path) -> None:
    """``mtl-orchestrate certs`` and ``render`` do their whole job without loading torch."""
    args = [a.format(tmp=tmp_path) for a in argv]
    code = textwrap.dedent(
        f"""
        import atexit, sys
        atexit.register(lambda: print("TORCH_LOADED" if "torch" in sys.modules else "TORCH_FREE"))
        sys.argv = ["mtl-orchestrate", *{args!r}]
        from orchestrator.cli import main
        main()
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("TORCH_FREE"), out.stdout
    assert any((tmp_path / args[args.index("--out") + 1].rsplit("/", 1)[-1]).iterdir())
