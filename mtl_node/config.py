"""Agent configuration: one validated object built from a YAML file and/or CLI flags.

Every field error becomes a ``ConfigError`` naming the field and the fix; the CLI prints it on one
line and exits 2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtl_node.aggregation import RULES, RuleParams
from mtl_node.core.errors import ConfigError
from mtl_node.core.ids import ID_PATTERN
from mtl_node.identity import DEFAULT_TRUST_DOMAIN, check_trust_domain
from mtl_node.tasks import TASKS

_HOSTPORT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


def parse_hostport(value: str, field: str) -> tuple[str, int]:
    m = _HOSTPORT.match(value.strip())
    if not m or not 0 <= int(m.group(2)) <= 65535:
        raise ConfigError(field, f"{value!r} is not HOST:PORT", "e.g. 127.0.0.1:50051 or [::1]:50051")
    return m.group(1), int(m.group(2))


class ServerLimits(BaseModel):
    """What one daemon's gRPC server accepts at once (mtl_node.limits; docs/operations.md).

    A call over a limit is refused at once with RESOURCE_EXHAUSTED, never queued. "Peer" is the
    caller's identity (its address until calls are authenticated).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrent_rpcs: int = Field(256, ge=1, le=100_000, description="calls in progress, all peers")
    max_rpcs_per_peer: int = Field(32, ge=1, le=100_000, description="calls in progress from one peer")
    max_watchers: int = Field(16, ge=0, le=10_000, description="WatchStatus streams, all peers")
    max_watchers_per_peer: int = Field(2, ge=0, le=10_000, description="WatchStatus streams from one peer")
    max_rounds_ahead: int = Field(
        2,
        ge=1,
        le=1000,
        description="GetModel waits at most this many rounds past the latest",
    )
    max_requester_bytes: int = Field(128, ge=1, le=4096, description="longest requester id accepted")


class NodeConfig(BaseModel):
    """Everything one agent daemon needs. Keyword-only; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN, description="this agent's id")
    listen: str = Field("127.0.0.1:0", description="HOST:PORT to serve on (port 0 = any free)")
    neighbors: dict[str, str] = Field(
        default_factory=dict, description="neighbour id -> HOST:PORT, in aggregation order"
    )
    task: str = "target-localization"
    task_params: dict[str, Any] = Field(default_factory=dict)
    rule: str = "loss-filtered"
    rule_params: RuleParams = Field(default_factory=lambda: RuleParams())
    rounds: int = Field(100, ge=0, le=10_000_000)
    seed: int = Field(0, ge=0, lt=2**63)
    device: str = "cpu"
    attack: str | None = None
    attack_params: dict[str, Any] = Field(default_factory=dict)
    fetch_timeout: float = Field(
        30.0, gt=0, allow_inf_nan=False, description="deadline of one model fetch, seconds"
    )
    startup_timeout: float = Field(
        120.0,
        gt=0,
        allow_inf_nan=False,
        description="how long round 1 waits for neighbours to come up, seconds",
    )
    keep_rounds: int = Field(4, ge=1, le=1000, description="published rounds kept for slow peers")
    limits: ServerLimits = Field(default_factory=lambda: ServerLimits(), description="server limits")
    results_dir: Path | None = None
    metrics_listen: str | None = Field(
        None, description="HOST:PORT of the Prometheus metrics endpoint (port 0 = any free; none: off)"
    )
    save_models_every: int = Field(
        0, ge=0, description="export the combined model every N rounds (results_dir/models, safetensors)"
    )
    state_dir: Path | None = Field(
        None, description="crash-only state (resumed on start); default results_dir/state"
    )
    state_every: int | None = Field(
        None,
        ge=0,
        description="write the state every N rounds (0: never; unset: auto, at most ~10% of the "
        "time and at most keep-2 rounds apart; see docs/performance.md)",
    )
    exit_when_done: bool = False
    linger: float = Field(
        5.0,
        ge=0,
        allow_inf_nan=False,
        description="with exit_when_done: seconds to keep serving after the last round",
    )
    # Mutual TLS (DESIGN §5 "Identity"; mtl_node.identity). Without ca/cert/key the daemon refuses
    # to start unless insecure is set.
    ca: Path | None = Field(None, description="PEM file of the CA(s) to trust")
    cert: Path | None = Field(None, description="this agent's certificate (PEM, chain allowed)")
    key: Path | None = Field(None, description="this agent's private key (PEM, unencrypted)")
    trust_domain: str = Field(DEFAULT_TRUST_DOMAIN, description="SPIFFE trust domain of every identity")
    insecure: bool = Field(False, description="plaintext, unauthenticated gRPC (explicit opt-out)")
    health_listen: str | None = Field(
        None, description="HOST:PORT of a plaintext grpc.health.v1-only server for probes"
    )
    peers_file: Path | None = Field(
        None,
        description="JSON {neighbour id: HOST:PORT} to wait for after binding (addresses of "
        "neighbours started at the same time on port 0)",
    )

    @field_validator("trust_domain")
    @classmethod
    def _trust_domain(cls, v: str) -> str:
        return check_trust_domain(v)

    @field_validator("health_listen")
    @classmethod
    def _health_listen(cls, v: str | None) -> str | None:
        if v is not None:
            parse_hostport(v, "health_listen")
        return v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_hostport(v, "listen")
        return v

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, v: str | None) -> str | None:
        if v is not None:
            parse_hostport(v, "metrics_listen")
        return v

    @field_validator("neighbors")
    @classmethod
    def _neighbors(cls, v: dict[str, str]) -> dict[str, str]:
        for nid, addr in v.items():
            if not re.match(ID_PATTERN, nid):
                raise ValueError(f"neighbour id {nid!r} is not a valid id")
            parse_hostport(addr, f"neighbors.{nid}")
        return v

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        TASKS.get(v, field="task")
        return v

    @field_validator("rule")
    @classmethod
    def _rule(cls, v: str) -> str:
        RULES.get(v, field="rule")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.match(r"^(cpu|cuda(:\d+)?)$", v):
            raise ValueError("must be cpu, cuda or cuda:N")
        if v.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError("CUDA is not available on this machine; use --device cpu")
        return v

    @model_validator(mode="after")
    def _not_own_neighbour(self) -> NodeConfig:
        if self.id in self.neighbors:
            raise ConfigError(f"neighbors.{self.id}", "lists the agent itself", "remove it from neighbors")
        return self

    @property
    def role(self) -> str:
        return "byzantine" if self.attack else "normal"

    @property
    def state_path(self) -> Path | None:
        """Where the agent's crash-only state lives (None: nowhere, e.g. in-process runs)."""
        if self.state_every == 0:
            return None
        if self.state_dir is not None:
            return self.state_dir
        return self.results_dir / "state" if self.results_dir is not None else None


def _format_validation_error(exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(NodeConfig.model_fields))
        return ConfigError(loc, "unknown field", f"valid fields: {allowed}")
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, ConfigError):
        return cause
    return ConfigError(loc, f"{msg} (got {err.get('input')!r})")


def build_config(data: dict[str, Any]) -> NodeConfig:
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise _format_validation_error(exc) from None


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML file, or a JSON file (by its .json suffix: what orchestrators write; parsed as JSON
    because YAML 1.1 would read a number such as 1e-12 as a string)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", f"{path} is not a text file", "give a YAML or JSON file") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else (yaml.safe_load(text) or {})
    except RecursionError:
        raise ConfigError(
            "--config", f"{path} is nested too deeply", "a config is a few levels deep"
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid JSON: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of fields")
    return data
