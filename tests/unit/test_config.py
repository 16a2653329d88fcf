"""Configuration errors: each names the field and says how to fix it; the CLI exits 2 on one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mtl_node.aggregation import RULES
from mtl_node.attack_api import make_attack
from mtl_node.config import NodeConfig, build_config, load_yaml
from mtl_node.core.errors import ConfigError, UnknownNameError
from mtl_node.tasks import TASKS, make_task


def config_error(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        build_config(data)
    return exc.value


def test_good_config_loads() -> None:
    cfg = build_config(
        {
            "id": "agent-1",
            "listen": "127.0.0.1:0",
            "neighbors": {"b": "127.0.0.1:5002", "a": "[::1]:5001", "c": "node-c.local:6000"},
            "task": "target-localization",
            "task_params": {"mu": 0.2},
            "rule": "loss-filtered",
            "rule_params": {"nu": 0.05, "ema_init": None},
            "rounds": 10,
            "seed": 3,
        }
    )
    assert isinstance(cfg, NodeConfig)
    assert list(cfg.neighbors) == ["b", "a", "c"]  # order kept: it is the aggregation order
    assert cfg.rule_params.nu == 0.05 and cfg.rule_params.ema_init is None
    assert cfg.role == "normal"
    assert build_config({"id": "x", "attack": "constant"}).role == "byzantine"


def test_defaults() -> None:
    cfg = build_config({"id": "a"})
    assert cfg.task in TASKS and cfg.rule in RULES
    assert cfg.device == "cpu" and cfg.neighbors == {}


def test_bad_listen() -> None:
    err = config_error({"id": "a", "listen": "localhost"})
    assert err.field == "listen"
    assert "HOST:PORT" in str(err) and "127.0.0.1:50051" in str(err)
    assert config_error({"id": "a", "listen": "127.0.0.1:70000"}).field == "listen"


def test_bad_neighbour_address() -> None:
    err = config_error({"id": "a", "neighbors": {"b": "127.0.0.1:1", "c": "127.0.0.1"}})
    assert err.field == "neighbors.c"
    assert str(err).startswith("neighbors.c:") and "HOST:PORT" in str(err)


def test_bad_neighbour_id() -> None:
    err = config_error({"id": "a", "neighbors": {"b c": "127.0.0.1:1"}})
    assert "neighbors" in err.field and "'b c'" in str(err)


def test_neighbour_equal_to_own_id() -> None:
    err = config_error({"id": "a", "neighbors": {"b": "127.0.0.1:1", "a": "127.0.0.1:2"}})
    assert err.field.startswith("neighbors")
    assert "itself" in str(err) and "remove" in str(err)


def test_unknown_task_lists_valid_tasks() -> None:
    err = config_error({"id": "a", "task": "mnist"})
    assert isinstance(err, UnknownNameError)
    assert err.field == "task"
    assert "'mnist'" in str(err)
    for name in TASKS.names():
        assert name in str(err)


def test_unknown_rule_lists_valid_rules() -> None:
    err = config_error({"id": "a", "rule": "medain"})
    assert err.field == "rule"
    assert "'medain'" in str(err)
    for name in RULES.names():
        assert name in str(err)


def test_unknown_field_lists_valid_fields() -> None:
    err = config_error({"id": "a", "neighbours": {}})
    assert err.field == "neighbours"
    assert "unknown field" in str(err)
    for name in NodeConfig.model_fields:
        assert name in str(err)


def test_rounds_negative() -> None:
    err = config_error({"id": "a", "rounds": -1})
    assert err.field == "rounds"
    assert "0" in str(err) and "-1" in str(err)


def test_bad_rule_params_name_the_nested_field() -> None:
    assert config_error({"id": "a", "rule_params": {"nu": 0}}).field == "rule_params.nu"
    assert config_error({"id": "a", "rule_params": {"floor": -1}}).field == "rule_params.floor"
    assert config_error({"id": "a", "rule_params": {"bogus": 1}}).field == "rule_params.bogus"


def test_device_gpu() -> None:
    err = config_error({"id": "a", "device": "gpu"})
    assert err.field == "device"
    assert "cpu" in str(err) and "cuda" in str(err) and "'gpu'" in str(err)


def test_cuda_when_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend there is no GPU, so this checks the message on machines that have one too.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        err = config_error({"id": "a", "device": device})
        assert err.field == "device"
        assert "CUDA is not available" in str(err) and "--device cpu" in str(err)


def test_bad_id() -> None:
    assert config_error({"id": "has space"}).field == "id"
    assert config_error({}).field == "id"


def test_task_param_errors_name_task_params_field() -> None:
    with pytest.raises(ConfigError) as exc:
        make_task("target-localization", "a", 0, {"mu": 2})
    assert exc.value.field == "task_params.mu"
    assert "mu" in str(exc.value) and "(got 2)" in str(exc.value)

    with pytest.raises(ConfigError) as exc:
        make_task("target-localization", "a", 0, {"learning_rate": 0.1})
    assert exc.value.field == "task_params.learning_rate"
    for name in TASKS.get("target-localization").Params.model_fields:
        assert name in str(exc.value)  # the hint lists the valid parameters

    with pytest.raises(UnknownNameError):
        make_task("mnist", "a", 0, {})


def test_attack_param_errors() -> None:
    with pytest.raises(ConfigError) as exc:
        make_attack("constant", "a", 0, {"low": 3.0, "high": 1.0})
    err = exc.value
    assert err.field.startswith("attack_params")
    assert "high must be >= low" in str(err)
    assert "Value error" not in str(err)

    with pytest.raises(ConfigError) as exc:
        make_attack("constant", "a", 0, {"redraw": "sometimes"})
    assert exc.value.field == "attack_params.redraw"

    with pytest.raises(UnknownNameError) as exc:
        make_attack("flood", "a", 0, {})
    assert exc.value.field == "attack" and "constant" in str(exc.value)


def test_load_yaml(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("id: a\nrounds: 5\nneighbors:\n  b: 127.0.0.1:5002\n")
    assert build_config(load_yaml(good)).neighbors == {"b": "127.0.0.1:5002"}

    with pytest.raises(ConfigError) as exc:
        load_yaml(tmp_path / "missing.yaml")
    assert exc.value.field == "--config" and "missing.yaml" in str(exc.value)

    bad = tmp_path / "bad.yaml"
    bad.write_text("id: a\nneighbors: {b: [\n")
    with pytest.raises(ConfigError) as exc:
        load_yaml(bad)
    assert exc.value.field == "--config" and "not valid YAML" in str(exc.value)

    listing = tmp_path / "list.yaml"
    listing.write_text("- id: a\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(listing)

    # YAML tags that would build Python objects are refused by the safe loader.
    evil = tmp_path / "evil.yaml"
    evil.write_text("id: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError):
        load_yaml(evil)


# -- the CLI (real subprocesses) --------------------------------------------------------------------


def mtl_node_exe() -> str:
    exe = Path(sys.executable).parent / "mtl-node"
    found = str(exe) if exe.exists() else shutil.which("mtl-node")
    assert found, "the mtl-node console script is not installed: run pip install -e '.[dev]'"
    return found


CLI_CASES = {
    "unknown rule": (["--id", "a", "--rule", "medain"], "rule"),
    "bad neighbours item": (["--id", "a", "--neighbors", "b=127.0.0.1:5002,c127.0.0.1:5003"], "--neighbors"),
    "bad task param": (["--id", "a", "--task-param", "mu"], "--task-param"),
}


def test_cli_user_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    # Started together: each one imports torch, which takes a while on a busy machine.
    procs = {
        case: subprocess.Popen(
            [mtl_node_exe(), "serve", *args, "--results-dir", str(tmp_path / "results")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, (args, _) in CLI_CASES.items()
    }
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        field = CLI_CASES[case][1]
        assert proc.returncode == 2, (case, out, err)
        assert "Traceback" not in err, case
        lines = err.splitlines()
        assert len(lines) == 1, (case, err)
        assert lines[0].startswith("mtl-node: error: "), (case, err)
        assert lines[0].startswith(f"mtl-node: error: {field}:"), (case, err)
        assert out == "", case
    assert not (tmp_path / "results").exists()  # nothing started
