"""A run plan: the fully resolved topology, one AgentPlan per agent. Plain data, no torch.

The spec (orchestrator.spec) is what a user writes; the plan is what every backend deploys: graph
drawn, Byzantine agents chosen, per-agent task parameters resolved. ``plan.json`` in the results
directory is this object, and the report reads it to draw the network.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Role = Literal["normal", "byzantine"]


@dataclass(frozen=True)
class AgentPlan:
    id: str
    role: Role
    neighbors: tuple[str, ...]  # agents this one fetches from, in aggregation order
    task: str
    task_params: dict[str, Any] = field(default_factory=dict)
    attack: str | None = None
    attack_params: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    host: str | None = None
    group: int | None = None  # task group (e.g. which target), for colouring plots
    position: tuple[float, float] | None = None  # for drawing the network
    rule_params: dict[str, Any] = field(default_factory=dict)  # this agent's knobs over the run's


@dataclass(frozen=True)
class RunPlan:
    name: str
    task: str
    rules: tuple[str, ...]  # compared on identical topology and seeds, one run each
    rounds: int
    seed: int
    rule_params: dict[str, Any]  # nu, ema_init, floor (mtl_node.aggregation.RuleParams)
    agents: tuple[AgentPlan, ...]
    fetch_timeout: float = 30.0
    window: float = 0.2  # summary statistics over the last `window` share of rounds
    warnings: tuple[str, ...] = ()

    def agent(self, agent_id: str) -> AgentPlan:
        for a in self.agents:
            if a.id == agent_id:
                return a
        raise KeyError(agent_id)

    @property
    def normal_ids(self) -> list[str]:
        return [a.id for a in self.agents if a.role == "normal"]

    def node_config_data(self, agent: AgentPlan, rule: str) -> dict[str, Any]:
        """The fields of mtl_node.config.NodeConfig for ``agent`` (addresses/listen left out)."""
        return {
            "id": agent.id,
            "task": agent.task,
            "task_params": dict(agent.task_params),
            "rule": rule,
            "rule_params": {**self.rule_params, **agent.rule_params},
            "rounds": self.rounds,
            "seed": self.seed,
            "device": agent.device,
            "attack": agent.attack,
            "attack_params": dict(agent.attack_params),
            "fetch_timeout": self.fetch_timeout,
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunPlan:
        agents = tuple(
            AgentPlan(
                **{
                    **a,
                    "neighbors": tuple(a["neighbors"]),
                    "position": tuple(a["position"]) if a.get("position") else None,
                }
            )
            for a in data["agents"]
        )
        return cls(
            **{**data, "agents": agents, "rules": tuple(data["rules"]), "warnings": tuple(data["warnings"])}
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: Path) -> RunPlan:
        return cls.from_json(json.loads(path.read_text()))
