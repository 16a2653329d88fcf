"""``mtl-node``: run one agent daemon, and small client tools to look at running agents."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from mtl_node.core.errors import ConfigError, MTLError

if TYPE_CHECKING:
    from mtl_node.config import NodeConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="One agent of a Byzantine-resilient distributed multi-task network.",
    pretty_exceptions_enable=False,
)
log = logging.getLogger("mtl_node")


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"mtl-node: error: {exc}", err=True)
    return typer.Exit(2)


def parse_pairs(items: list[str], field: str) -> dict[str, Any]:
    """``k=v`` items; values are YAML scalars/lists so numbers and ``[1, 2]`` keep their type."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(field, f"{item!r} is not KEY=VALUE", "e.g. mu=0.1")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def parse_neighbors(spec: str) -> dict[str, str]:
    """``a=127.0.0.1:5001,b=127.0.0.1:5002`` -> {"a": ..., "b": ...} (order kept)."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        nid, sep, addr = part.partition("=")
        if not sep or not nid or not addr:
            raise ConfigError(
                "--neighbors", f"{part!r} is not ID=HOST:PORT", "e.g. --neighbors b=127.0.0.1:5002"
            )
        if nid in out:
            raise ConfigError("--neighbors", f"neighbour {nid!r} listed twice")
        out[nid] = addr
    return out


def setup_logging(level: str, fmt: str = "text") -> None:
    """mtl_node.logs.setup_logging; a bad level or format exits 2 with one line."""
    from mtl_node.logs import setup_logging as setup

    try:
        setup(level, fmt)
    except ConfigError as exc:
        raise _fail(exc) from None


def check_agent(cfg: NodeConfig) -> None:
    """Build the agent's parts once before serving, so that task and attack parameter errors and
    a rule whose assumptions the neighbourhood cannot meet exit 2 with one clear line."""
    from mtl_node.aggregation.robust import check_neighbourhood
    from mtl_node.attack_api import attack_of
    from mtl_node.identity import agent_id, party_tls
    from mtl_node.tasks import make_task

    party_tls(
        cfg.ca,
        cfg.cert,
        cfg.key,
        insecure=cfg.insecure,
        expect=agent_id(cfg.id, cfg.trust_domain),
        who=f"agent {cfg.id}",
    )
    task = make_task(cfg.task, cfg.id, cfg.seed, cfg.task_params, "cpu")
    if cfg.state_path is not None:
        # A state directory from another run is refused before anything serves (exit 2).
        from mtl_node import state, wire

        state.check(cfg.state_path, state.fingerprint(cfg, wire.manifest_of(task.init_model())))
    if cfg.attack:
        attack_of(cfg, network=True)
    else:
        check_neighbourhood(cfg.rule, cfg.rule_params, len(cfg.neighbors), cfg.id, "rule")


@app.command()
def serve(
    id: Annotated[str | None, typer.Option("--id", help="this agent's id")] = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT to serve on (port 0: any)")] = None,
    neighbors: Annotated[str | None, typer.Option(help="ID=HOST:PORT,... in order")] = None,
    task: Annotated[str | None, typer.Option(help="task name (mtl-node tasks)")] = None,
    task_param: Annotated[list[str] | None, typer.Option(help="task parameter KEY=VALUE")] = None,
    rule: Annotated[str | None, typer.Option(help="aggregation rule (mtl-node rules)")] = None,
    rule_param: Annotated[list[str] | None, typer.Option(help="rule parameter KEY=VALUE")] = None,
    rounds: Annotated[int | None, typer.Option(help="number of rounds")] = None,
    seed: Annotated[int | None, typer.Option(help="run seed")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N")] = None,
    attack: Annotated[str | None, typer.Option(help="make this agent Byzantine")] = None,
    attack_param: Annotated[list[str] | None, typer.Option(help="attack parameter KEY=VALUE")] = None,
    results_dir: Annotated[Path | None, typer.Option(help="write metrics/decisions here")] = None,
    save_models_every: Annotated[
        int | None, typer.Option(help="export the model every N rounds (results_dir/models)")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="crash-only state, resumed on start (default RESULTS_DIR/state)")
    ] = None,
    state_every: Annotated[
        int | None, typer.Option(help="write the state every N rounds (0: never; default: auto)")
    ] = None,
    fetch_timeout: Annotated[float | None, typer.Option(help="deadline per fetch, s")] = None,
    metrics_listen: Annotated[
        str | None, typer.Option(help="HOST:PORT for Prometheus metrics (port 0: any; default off)")
    ] = None,
    exit_when_done: Annotated[
        bool | None, typer.Option("--exit-when-done/--keep-serving", help="exit after last round")
    ] = None,
    ca: Annotated[Path | None, typer.Option(help="CA certificate(s) to trust (PEM)")] = None,
    cert: Annotated[Path | None, typer.Option(help="this agent's certificate (PEM)")] = None,
    key: Annotated[Path | None, typer.Option(help="this agent's private key (PEM)")] = None,
    trust_domain: Annotated[str | None, typer.Option(help="SPIFFE trust domain")] = None,
    insecure: Annotated[
        bool | None,
        typer.Option("--insecure", help="plaintext, unauthenticated gRPC (not for real networks)"),
    ] = None,
    health_listen: Annotated[
        str | None, typer.Option(help="HOST:PORT for plaintext health checks only (probes)")
    ] = None,
    peers_file: Annotated[
        Path | None, typer.Option(help="JSON {id: HOST:PORT} of neighbours, waited for after binding")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file with any of these fields")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    log_format: Annotated[str, typer.Option(help="text, or json (one JSON object a line)")] = "text",
) -> None:
    """Run one agent: serve its model over gRPC, learn for ROUNDS rounds, keep serving.

    Mutual TLS is the default: give --ca/--cert/--key (made by `mtl-orchestrate certs`, or any CA
    issuing the URI SAN spiffe://<trust-domain>/agent/<id>), or --insecure to opt out.
    """
    from mtl_node.config import build_config, load_yaml

    setup_logging(log_level, log_format)
    try:
        data: dict[str, Any] = load_yaml(config) if config else {}
        flags: dict[str, Any] = {
            "id": id,
            "listen": listen,
            "task": task,
            "rule": rule,
            "rounds": rounds,
            "seed": seed,
            "device": device,
            "attack": attack,
            "results_dir": results_dir,
            "save_models_every": save_models_every,
            "state_dir": state_dir,
            "state_every": state_every,
            "fetch_timeout": fetch_timeout,
            "metrics_listen": metrics_listen,
            "exit_when_done": exit_when_done,
            "ca": ca,
            "cert": cert,
            "key": key,
            "trust_domain": trust_domain,
            "insecure": insecure,
            "health_listen": health_listen,
            "peers_file": peers_file,
        }
        data |= {k: v for k, v in flags.items() if v is not None}
        if neighbors is not None:
            data["neighbors"] = parse_neighbors(neighbors)
        if task_param:
            data["task_params"] = {
                **data.get("task_params", {}),
                **parse_pairs(task_param, "--task-param"),
            }
        if rule_param:
            data["rule_params"] = {
                **data.get("rule_params", {}),
                **parse_pairs(rule_param, "--rule-param"),
            }
        if attack_param:
            data["attack_params"] = {
                **data.get("attack_params", {}),
                **parse_pairs(attack_param, "--attack-param"),
            }
        if "id" not in data:
            raise ConfigError("--id", "missing", "give --id NAME or id: in the config file")
        cfg = build_config(data)
        check_agent(cfg)
        from mtl_node.daemon import run_daemon
    except MTLError as exc:
        raise _fail(exc) from None
    raise typer.Exit(run_daemon([cfg], cfg.exit_when_done, cfg.linger))


@app.command("serve-many")
def serve_many(
    config: Annotated[Path, typer.Option(help="YAML/JSON file: {agents: [agent config, ...]}")],
    exit_when_done: Annotated[bool, typer.Option(help="exit after every agent finished")] = False,
    linger: Annotated[float, typer.Option(help="with --exit-when-done: keep serving N s")] = 5.0,
    metrics_listen: Annotated[
        str | None,
        typer.Option(help="HOST:PORT for the process's Prometheus metrics, one `agent` label per agent"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
    log_format: Annotated[str, typer.Option(help="text, or json (one JSON object a line)")] = "text",
) -> None:
    """Host several agents in one process, each with its own gRPC server and port.

    Saves the ~230 MB a torch process costs per agent when many agents share one machine.
    """
    from mtl_node.config import build_config, load_yaml
    from mtl_node.daemon import run_daemon

    setup_logging(log_level, log_format)
    try:
        data = load_yaml(config)
        unknown = sorted(set(data) - {"agents", "metrics_listen"})
        if unknown:
            raise ConfigError(unknown[0], "unknown field", "valid fields: agents, metrics_listen")
        metrics_listen = metrics_listen or data.get("metrics_listen")
        if metrics_listen is not None:
            from mtl_node.config import parse_hostport

            parse_hostport(str(metrics_listen), "--metrics-listen")
        items = data.get("agents")
        if not isinstance(items, list) or not items:
            raise ConfigError("agents", "must be a non-empty list of agent configs", f"in {config}")
        configs = []
        for index, item in enumerate(items):
            try:
                cfg = build_config(item if isinstance(item, dict) else {})
                check_agent(cfg)
            except ConfigError as exc:
                raise ConfigError(f"agents[{index}].{exc.field}", exc.problem, exc.fix) from None
            configs.append(cfg)
    except MTLError as exc:
        raise _fail(exc) from None
    raise typer.Exit(run_daemon(configs, exit_when_done, linger, metrics_listen))


@app.command()
def rules() -> None:
    """List the aggregation rules."""
    from mtl_node.aggregation import RULES

    for entry in RULES:
        typer.echo(f"{entry.name:16} {entry.description}")


@app.command()
def tasks() -> None:
    """List the tasks and their parameters."""
    from mtl_node.tasks import TASKS

    for entry in TASKS:
        typer.echo(f"{entry.name:22} {entry.description}")
        for pname, f in entry.factory.Params.model_fields.items():
            typer.echo(f"    {pname:20} {f.description or ''}")


@app.command()
def attacks() -> None:
    """List the attacks (Byzantine behaviours) and their parameters."""
    from mtl_node.attack_api import ATTACKS, load_plugins

    load_plugins()
    for entry in ATTACKS:
        typer.echo(f"{entry.name:22} {entry.description}")
        for pname, f in entry.factory.Params.model_fields.items():
            typer.echo(f"    {pname:20} {f.description or ''} (default {f.default!r})")


CaOpt = Annotated[Path | None, typer.Option(help="CA certificate(s) to trust (PEM)")]
CertOpt = Annotated[Path | None, typer.Option(help="operator certificate (PEM)")]
KeyOpt = Annotated[Path | None, typer.Option(help="operator private key (PEM)")]
InsecureOpt = Annotated[bool, typer.Option("--insecure", help="plaintext (agents started with --insecure)")]
AgentOpt = Annotated[str | None, typer.Option("--agent", help="the agent expected at ADDRESS (default: any)")]
TrustOpt = Annotated[str, typer.Option(help="SPIFFE trust domain")]


def operator_channel_args(
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    insecure: bool,
    agent: str | None,
    trust_domain: str,
) -> dict[str, Any]:
    """``tls`` and ``expected_identity`` for channel.create_*channel from the tool's flags."""
    from mtl_node.identity import agent_id, check_trust_domain, party_tls

    tls = party_tls(ca, cert, key, insecure=insecure, who="this tool (an operator certificate)")
    expected = agent_id(agent, check_trust_domain(trust_domain, "--trust-domain")) if agent and tls else None
    return {"tls": tls, "expected_identity": expected}


@app.command()
def status(
    address: Annotated[str, typer.Argument(help="HOST:PORT of an agent")],
    timeout: Annotated[float, typer.Option(help="deadline, s")] = 5.0,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
    agent: AgentOpt = None,
    trust_domain: TrustOpt = "resilient-mtl",
) -> None:
    """Print an agent's info and status (needs an operator certificate unless --insecure)."""
    import grpc
    from google.protobuf import json_format

    from mtl_node.channel import create_sync_channel
    from mtl_node.proto.v1 import node_pb2 as pb
    from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc

    try:
        channel_args = operator_channel_args(ca, cert, key, insecure, agent, trust_domain)
        channel_ = create_sync_channel(address, **channel_args)
    except MTLError as exc:
        raise _fail(exc) from None
    with channel_ as channel:
        stub = pb_grpc.NodeStub(channel)
        try:
            info = stub.GetInfo(pb.GetInfoRequest(), timeout=timeout)
            st = stub.GetStatus(pb.GetStatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise _fail(ConnectionError(f"{address}: {exc.code().name}: {exc.details()}")) from None
    typer.echo(json_format.MessageToJson(info))
    typer.echo(json_format.MessageToJson(st))


@app.command()
def fetch(
    address: Annotated[str, typer.Argument(help="HOST:PORT of an agent")],
    out: Annotated[Path, typer.Option(help="where to write the .safetensors file")],
    round: Annotated[int, typer.Option(help="round (0: latest)")] = 0,
    timeout: Annotated[float, typer.Option(help="deadline, s")] = 30.0,
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    insecure: InsecureOpt = False,
    agent: AgentOpt = None,
    trust_domain: TrustOpt = "resilient-mtl",
) -> None:
    """Download the model an agent published for a round, as a safetensors file."""
    import grpc

    from mtl_node import messages, wire
    from mtl_node.channel import create_channel
    from mtl_node.client import fetch_payload
    from mtl_node.proto.v1 import node_pb2 as pb
    from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc

    async def go() -> tuple[int, bytearray]:
        channel_args = operator_channel_args(ca, cert, key, insecure, agent, trust_domain)
        async with create_channel(address, **channel_args) as channel:
            stub = pb_grpc.NodeStub(channel)
            info = await stub.GetInfo(pb.GetInfoRequest(), timeout=timeout)
            manifest = messages.manifest_from_pb(info.manifest)
            header, payload = await fetch_payload(stub, round, "", timeout, manifest)
            wire.decode(payload, manifest)
            return header.round, payload

    try:
        got_round, payload = asyncio.run(go())
    except MTLError as exc:
        raise _fail(exc) from None
    except grpc.aio.AioRpcError as exc:  # GetInfo: one line, not the RPC error's dump
        raise _fail(ConnectionError(f"{address}: {exc.code().name}: {exc.details()}")) from None
    except Exception as exc:
        raise _fail(ConnectionError(f"{address}: {exc}")) from None
    out.write_bytes(payload)
    typer.echo(f"round {got_round}: {len(payload)} bytes -> {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
