"""``sim``: every agent in this process on the in-process engine (no sockets).

The fast path for sweeps. ``-o engine=`` picks the engine:

- ``auto`` (default): the vectorized engine (mtl_node.batched for target localization,
  mtl_node.batched.torch_engine for torch tasks; the same rule and attack kernels as the agents) when it
  can run the plan, else the per-agent engine, with a log line saying why;
- ``per-agent``: the per-agent asyncio engine running the very same Agent code the daemons run
  (the oracle);
- ``batched``: the vectorized engine, or a ConfigError with the reason it cannot run the plan.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any

from mtl_node.core.errors import ConfigError
from orchestrator.backends.base import BACKENDS, Backend, Progress, Row, RunContext, RunOutput
from orchestrator.backends.common import check_options
from orchestrator.plan import RunPlan

log = logging.getLogger(__name__)

OPTIONS = ("engine",)
ENGINES = ("auto", "batched", "per-agent")


def engine_option(options: dict[str, Any] | None) -> str:
    """The ``-o engine=`` value, checked (before any agent is built)."""
    engine = str(check_options("sim", options or {}, OPTIONS).get("engine") or "auto")
    if engine not in ENGINES:
        raise ConfigError("--option engine", f"{engine!r} is not an engine", f"valid: {', '.join(ENGINES)}")
    return engine


IN_PROCESS = "inproc:0"


def plan_configs(plan: RunPlan, rule: str) -> list:  # type: ignore[type-arg]
    """NodeConfigs for the in-process engine (neighbour addresses are placeholders)."""
    from mtl_node.config import build_config

    configs = []
    for agent in plan.agents:
        data = plan.node_config_data(agent, rule)
        data["neighbors"] = {n: IN_PROCESS for n in agent.neighbors}
        configs.append(build_config(data))
    return configs


class _ProgressRecorder:
    """Collects rows and reports progress once every normal agent has finished a round."""

    def __init__(self, plan: RunPlan, ctx: RunContext) -> None:
        self.ctx = ctx
        self.plan = plan
        self.normal = set(plan.normal_ids)
        self.metrics: list[Row] = []
        self.decisions: list[Row] = []
        self._pending: dict[int, list[Row]] = defaultdict(list)

    def add(self, metrics_row: Row, decision_rows: list[Row]) -> None:
        self.metrics.append(metrics_row)
        if self.ctx.record_decisions:
            self.decisions.extend(decision_rows)
        if metrics_row["agent"] not in self.normal:
            return
        done = self._pending[metrics_row["round"]]
        done.append(metrics_row)
        if len(done) == len(self.normal):
            self.ctx.progress(summarize_round(self.ctx.rule, self.plan.rounds, done))
            del self._pending[metrics_row["round"]]


def summarize_round(rule: str, rounds: int, rows: list[Row]) -> Progress:
    losses = [r["loss"] for r in rows if r["loss"] is not None and math.isfinite(r["loss"])]
    n = max(len(rows), 1)
    return Progress(
        rule=rule,
        round=rows[0]["round"],
        rounds=rounds,
        mean_loss=sum(losses) / len(losses) if losses else math.nan,
        accepted=sum(r["accepted"] for r in rows) / n,
        filtered=sum(r["filtered"] for r in rows) / n,
        missing=sum(r["missing"] for r in rows) / n,
    )


@BACKENDS.register("sim", "all agents in this process, models handed over in memory")
class SimBackend(Backend):
    name = "sim"

    def run(self, plan: RunPlan, ctx: RunContext) -> RunOutput:
        import asyncio

        from mtl_node.engine import run_agents_async
        from mtl_node.recorder import Recorder, RoundRecord
        from mtl_node.wire import StateDict

        engine = engine_option(ctx.options)
        collector = _ProgressRecorder(plan, ctx)
        configs = plan_configs(plan, ctx.rule)

        from mtl_node import batched
        from mtl_node.batched import torch_engine

        on_tl = any(c.task == batched.TASK for c in configs)
        reason = None
        if engine != "per-agent":
            reason = (batched if on_tl else torch_engine).unsupported_reason(configs)
        if engine != "per-agent" and reason is None:
            if on_tl:
                return _run_batched(plan, ctx, configs)

            def forward(records: list[RoundRecord]) -> None:
                for rec in records:
                    # decisions are built when read: not at all unless they are recorded
                    rows = rec.decision_rows() if ctx.record_decisions else []
                    collector.add(rec.metrics_row(), rows)

            try:  # what only the built tasks tell (their models and losses) raises before round 1
                torch_engine.run_torch_batched(configs, on_round=forward)
                return RunOutput(collector.metrics, collector.decisions)
            except torch_engine.Unbatchable as exc:
                reason = exc.reason
        if engine == "batched" and reason is not None:
            raise ConfigError(
                "--option engine",
                f"the batched engine cannot run this: {reason}",
                "use engine=per-agent or auto",
            )
        if engine == "auto":
            log.warning(
                "sim: rule %s on the per-agent engine (the batched engine cannot: %s)", ctx.rule, reason
            )

        class Forward(Recorder):
            def record(self, rec: RoundRecord, model: StateDict) -> None:
                collector.add(rec.metrics_row(), rec.decision_rows())

        recorders: dict[str, Recorder] = {cfg.id: Forward() for cfg in configs}
        asyncio.run(run_agents_async(configs, recorders))
        return RunOutput(collector.metrics, collector.decisions)


def _run_batched(plan: RunPlan, ctx: RunContext, configs: list) -> RunOutput:  # type: ignore[type-arg]
    """The vectorized engine: all rounds at once, then progress replayed per round."""
    from mtl_node import batched

    result = batched.run_batched(configs, record_decisions=ctx.record_decisions)
    per_agent_seconds = (result.round_seconds / max(len(result.agents), 1)).tolist()
    metrics = []
    for row in result.metrics_rows():
        row["seconds"] = per_agent_seconds[row["round"] - 1]
        metrics.append(row)
    decisions = list(result.decision_rows()) if ctx.record_decisions else []
    normal = [k for k, role in enumerate(result.roles) if role == "normal"]
    for r in range(result.rounds):
        rows = [metrics[r * len(result.agents) + k] for k in normal]
        if rows:
            ctx.progress(summarize_round(ctx.rule, plan.rounds, rows))
    return RunOutput(metrics, decisions)
