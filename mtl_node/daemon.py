"""Running one agent as a long-lived gRPC daemon: start, serve, run the rounds, shut down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from mtl_node.agent import Agent
from mtl_node.client import GrpcTransport
from mtl_node.config import NodeConfig
from mtl_node.recorder import FileRecorder, Recorder
from mtl_node.server import create_server, set_serving, stop_server

log = logging.getLogger(__name__)


async def serve(config: NodeConfig) -> int:
    """Serve until SIGTERM/SIGINT (or, with exit_when_done, the last round plus ``linger``)."""
    recorder: Recorder = (
        FileRecorder(config.results_dir, config.save_models_every) if config.results_dir else Recorder()
    )
    transport = GrpcTransport(config.neighbors, device=config.device)
    agent = Agent(config, transport, recorder)
    server, port, health_servicer = await create_server(agent, config.listen)
    host = config.listen.rsplit(":", 1)[0]
    # One parseable line: orchestrators and scripts read the bound port from it.
    print(f"mtl-node: serving {config.id} on {host}:{port}", flush=True)
    await set_serving(health_servicer, True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    run = asyncio.create_task(agent.run(), name=f"rounds-{config.id}")
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({run, stopper}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if run.done():
        if run.exception() is not None:
            log.error("%s: round loop failed", config.id, exc_info=run.exception())
            code = 1
        else:
            log.info("%s: finished %d rounds", config.id, config.rounds)
            if config.exit_when_done:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), config.linger)
            else:
                await stop.wait()
    else:
        log.info("%s: stopping at round %d", config.id, agent.status.round)
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await run
        recorder.close()
    stopper.cancel()
    await set_serving(health_servicer, False)
    agent.store.close()
    await transport.close()
    await stop_server(server)
    return code


def run_daemon(config: NodeConfig) -> int:
    try:
        return asyncio.run(serve(config))
    except OSError as exc:
        print(f"mtl-node: error: listen: {exc}", file=sys.stderr)
        return 2
