"""A hostile client for the flood test and benchmarks/bench_flood.py: thousands of pending GetModel
calls (half for the next round, half for rounds far ahead) and unread WatchStatus streams against
one daemon, over a few connections, re-issuing whatever the server ends, at a bounded rate."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

import grpc
import psutil

from mtl_node.proto.v1 import node_pb2 as pb
from mtl_node.proto.v1 import node_pb2_grpc as pb_grpc

CALL_TIMEOUT_S = 300.0


class Flood:
    def __init__(
        self,
        address: str,
        calls: int = 3000,
        watchers: int = 3000,
        connections: int = 4,
        reissue_per_s: float = 200.0,
    ) -> None:
        self.address = address
        self.calls = calls
        self.watchers = watchers
        self.connections = connections
        self.reissue_per_s = reissue_per_s
        self.ended: Counter[str] = Counter()
        self.issued = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="flood", daemon=True)
        self.started = threading.Event()
        self.error: BaseException | None = None

    def __enter__(self) -> Flood:
        self._thread.start()
        if not self.started.wait(120):
            raise AssertionError(f"flood did not start: {self.error}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by __enter__/the test
            self.error = exc
            self.started.set()

    async def _run(self) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(self.address, options=options) for _ in range(self.connections)]
        stubs = [pb_grpc.NodeStub(c) for c in channels]
        info = await stubs[0].GetInfo(pb.GetInfoRequest(), timeout=30)
        latest = info.round

        def issue(k: int) -> Any:
            stub = stubs[k % len(stubs)]
            self.issued += 1
            if k % 3 == 0:
                return stub.WatchStatus(pb.WatchStatusRequest(), timeout=CALL_TIMEOUT_S)
            far = k % 3 == 1
            round_ = latest + (10**6 if far else 1)
            return stub.GetModel(pb.GetModelRequest(round=round_, requester="flood"), timeout=CALL_TIMEOUT_S)

        total = self.calls + self.watchers
        live = [issue(k) for k in range(total)]
        self.started.set()
        budget = 0.0
        last = checked = time.monotonic()
        while not self._stop.is_set():
            await asyncio.sleep(0.1)
            now = time.monotonic()
            if now - checked > 1.0:  # keep asking for the victim's next round as it moves on
                checked = now
                try:
                    latest = (await stubs[0].GetInfo(pb.GetInfoRequest(), timeout=5)).round
                except grpc.aio.AioRpcError as exc:
                    self.ended[f"GetInfo {exc.code().name}"] += 1
            budget = min(budget + (now - last) * self.reissue_per_s, self.reissue_per_s)
            last = now
            for k, call in enumerate(live):
                if budget < 1:
                    break
                if call.done():
                    code = await call.code()
                    self.ended[code.name] += 1
                    live[k] = issue(k)
                    budget -= 1
        for call in live:
            call.cancel()
        for c in channels:
            await c.close(grace=None)


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)
