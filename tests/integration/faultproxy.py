"""A TCP proxy on loopback that injects faults between two real daemons (tests only).

Runs its own asyncio loop in a thread. ``mode`` can be changed at any time and applies to data
from then on, on every connection:

- ``pass``: forward both ways;
- ``delay``: hold each server-to-client piece ``delay_s`` before forwarding it;
- ``stall``: stop forwarding server-to-client data (held, sent when the stall ends);
- ``cut``: close a connection once ``cut_after`` server-to-client bytes went through;
- ``corrupt``: flip one bit of every server-to-client piece after the first ``skip`` bytes;
- ``blackhole``: new connections are accepted and never answered; data is dropped.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

MODES = ("pass", "delay", "stall", "cut", "corrupt", "blackhole")


class FaultProxy:
    def __init__(self, target: Callable[[], str | None]) -> None:
        self.target = target
        self.mode = "pass"
        self.delay_s = 0.05
        self.cut_after = 64
        self.skip = 64
        self.corrupted = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="faultproxy", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, mode: str) -> None:
        assert mode in MODES, mode
        self.mode = mode

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        assert self._ready.wait(30), "proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = self.target()
        if self.mode == "blackhole" or target is None:
            if target is None:
                writer.close()
                return
            while await reader.read(65536):  # swallow, answer nothing
                pass
            writer.close()
            return
        host, port = target.rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        sent = 0

        async def upstream() -> None:
            while data := await reader.read(65536):
                if self.mode == "blackhole":
                    continue
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def downstream() -> None:
            nonlocal sent
            while data := await up_reader.read(65536):
                while self.mode in ("stall", "blackhole"):
                    await asyncio.sleep(0.05)
                if self.mode == "delay":
                    await asyncio.sleep(self.delay_s)
                if self.mode == "corrupt" and sent + len(data) > self.skip:
                    at = max(0, self.skip - sent) + (len(data) - max(0, self.skip - sent)) // 2
                    data = data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]
                    self.corrupted += 1
                if self.mode == "cut" and sent + len(data) > self.cut_after:
                    writer.write(data[: max(0, self.cut_after - sent)])
                    break
                writer.write(data)
                sent += len(data)
                await writer.drain()
            writer.close()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        writer.close()
        up_writer.close()
