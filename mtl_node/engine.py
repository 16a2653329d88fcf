"""The in-process engine: N agents, the same Agent code, models handed over in memory.

It is the fast path for sweeps and the oracle for tests: with the same configs and seeds it gives
the same per-round models as the agents running as gRPC daemons.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from mtl_node.agent import Agent
from mtl_node.config import NodeConfig
from mtl_node.recorder import MemoryRecorder, Recorder
from mtl_node.transport import InMemoryTransport, ModelSource

# Placeholder address for neighbours that live in the same process.
IN_PROCESS = "inproc:0"


async def run_agents_async(
    configs: Sequence[NodeConfig], recorders: dict[str, Recorder] | None = None
) -> dict[str, Agent]:
    sources: dict[str, ModelSource] = {}
    transport = InMemoryTransport(sources)
    agents: dict[str, Agent] = {}
    for cfg in configs:
        recorder = (recorders or {}).get(cfg.id) or MemoryRecorder()
        agent = Agent(cfg, transport, recorder)
        agents[cfg.id] = sources[cfg.id] = agent
    await asyncio.gather(*(agent.run() for agent in agents.values()))
    return agents


def run_agents(configs: Sequence[NodeConfig], keep_models: bool = False) -> dict[str, MemoryRecorder]:
    """Run every agent to its last round; returns each agent's records (and models if asked)."""
    recorders = {cfg.id: MemoryRecorder(keep_models=keep_models) for cfg in configs}
    asyncio.run(run_agents_async(configs, dict(recorders)))
    return recorders
