"""Conversions between the agent's Python objects and mtl.v1 protobuf messages (no grpc import)."""

from __future__ import annotations

import math

from mtl_node import PROTOCOL, wire
from mtl_node.agent import Agent, AgentStatus
from mtl_node.proto.v1 import node_pb2 as pb


def manifest_to_pb(m: wire.Manifest) -> pb.ModelManifest:
    return pb.ModelManifest(
        tensors=[pb.TensorSpec(name=t.name, dtype=t.dtype, shape=list(t.shape)) for t in m.tensors],
        data_bytes=m.data_bytes,
    )


def manifest_from_pb(m: pb.ModelManifest) -> wire.Manifest:
    return wire.Manifest(
        tuple(wire.TensorSpec(t.name, t.dtype, tuple(int(d) for d in t.shape)) for t in m.tensors)
    )


def info_to_pb(agent: Agent) -> pb.NodeInfo:
    return pb.NodeInfo(
        agent_id=agent.id,
        task=agent.config.task,
        rule=agent.config.rule,
        role=agent.config.role,
        manifest=manifest_to_pb(agent.manifest),
        round=max(agent.store.latest_round, 0),
        rounds_total=agent.config.rounds,
        protocol=PROTOCOL,
        device=agent.config.device,
    )


def status_to_pb(s: AgentStatus) -> pb.NodeStatus:
    msg = pb.NodeStatus(
        agent_id=s.agent_id,
        round=s.round,
        rounds_total=s.rounds_total,
        state=s.state,
        loss=s.metrics.loss if s.metrics else math.nan,
        accepted=s.accepted,
        filtered=s.filtered,
        missing=s.missing,
        role=s.role,
        rule=s.rule,
        neighbors=[
            pb.NeighborStatus(
                agent_id=d.agent_id,
                decision=d.decision,
                ema=d.ema,
                weight=d.weight,
                loss=d.loss,
                reason=d.reason,
            )
            for d in s.decisions
        ],
    )
    if s.metrics and s.metrics.test_loss is not None:
        msg.test_loss = s.metrics.test_loss
    if s.metrics and s.metrics.test_accuracy is not None:
        msg.test_accuracy = s.metrics.test_accuracy
    if s.metrics and s.metrics.attack_success is not None:
        msg.attack_success = s.metrics.attack_success
    return msg
