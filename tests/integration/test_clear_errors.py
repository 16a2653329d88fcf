"""Bad input on the command lines: one line naming the field or address and the fix, exit code 2,
no traceback (issue 11's list)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
NODE = str(BIN / "mtl-node")
ORCH = str(BIN / "mtl-orchestrate")
DEEP = "[" * 50_000 + "]" * 50_000
TOPOLOGY = "name: t\ntask: target-localization\nagents: 3\ngraph: complete\nrules: [average]\nrounds: 2\n"


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def assert_clear(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr and "AioRpcError" not in done.stderr, done.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    deep = tmp_path / "deep.yaml"
    deep.write_text(DEEP)
    topology = tmp_path / "t.yaml"
    topology.write_text(TOPOLOGY)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    return {"binary": binary, "deep": deep, "topology": topology, "blocker": blocker}


def test_serve_config_that_is_binary(files: dict[str, Path]) -> None:
    assert_clear(run(NODE, "serve", "--config", str(files["binary"])), "--config", "not a text file")


def test_serve_and_up_with_deeply_nested_yaml(files: dict[str, Path], tmp_path: Path) -> None:
    assert_clear(run(NODE, "serve", "--config", str(files["deep"])), "--config", "nested too deeply")
    up = run(ORCH, "up", str(files["deep"]), "--backend", "sim", "--out", str(tmp_path / "o"))
    assert_clear(up, "topology", "nested too deeply")


def test_listen_on_an_address_that_cannot_be_bound() -> None:
    # 192.0.2.1 (TEST-NET-1) is never an address of this machine: bind fails, nothing is sent.
    done = run(NODE, "serve", "--id", "x", "--insecure", "--listen", "192.0.2.1:5000", "--rounds", "1")
    assert_clear(done, "listen", "192.0.2.1:5000")


def test_results_dir_errors_name_results_dir(files: dict[str, Path]) -> None:
    results = files["blocker"] / "results"  # under a regular file: cannot be created
    done = run(NODE, "serve", "--id", "x", "--insecure", "--results-dir", str(results), "--rounds", "1")
    assert_clear(done, "results_dir", str(results))
    assert "listen" not in done.stderr.split("error:")[1]


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0"])
def test_fetch_timeout_must_be_finite_and_positive(value: str) -> None:
    done = run(NODE, "serve", "--id", "x", "--insecure", "--fetch-timeout", value, "--rounds", "1")
    assert_clear(done, "fetch_timeout")


def test_log_level_and_format_must_exist(files: dict[str, Path], tmp_path: Path) -> None:
    assert_clear(
        run(NODE, "serve", "--id", "x", "--insecure", "--log-level", "bogus"), "--log-level", "debug"
    )
    assert_clear(run(NODE, "serve", "--id", "x", "--insecure", "--log-format", "xml"), "--log-format", "json")
    up = run(
        ORCH, "up", str(files["topology"]), "--backend", "sim", "--log-level", "bogus", "--out", str(tmp_path)
    )
    assert_clear(up, "--log-level")


def test_fetch_from_an_unreachable_agent_is_one_line() -> None:
    done = run(NODE, "fetch", "127.0.0.1:1", "--out", "/dev/null", "--insecure", "--timeout", "3")
    assert_clear(done, "127.0.0.1:1", "UNAVAILABLE")


@pytest.mark.parametrize("backend", ["sim", "local"])
def test_unknown_backend_option_lists_the_valid_ones(
    files: dict[str, Path], tmp_path: Path, backend: str
) -> None:
    done = run(
        ORCH,
        "up",
        str(files["topology"]),
        "--backend",
        backend,
        "-o",
        "procesess=2",
        "--out",
        str(tmp_path / "o"),
    )
    assert_clear(done, "procesess", "valid")


def test_processes_below_one(files: dict[str, Path], tmp_path: Path) -> None:
    done = run(
        ORCH,
        "up",
        str(files["topology"]),
        "--backend",
        "local",
        "--processes",
        "-1",
        "--out",
        str(tmp_path / "o"),
    )
    assert_clear(done, "--processes")


def test_json_log_lines(tmp_path: Path) -> None:
    done = run(
        NODE, "serve", "--id", "j", "--insecure", "--rounds", "2", "--exit-when-done",
        "--log-format", "json", "--log-level", "info",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert entries, done.stderr
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any("finished 2 rounds" in e["message"] for e in entries)
