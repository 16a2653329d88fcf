"""ModelStore: what an agent has published, and waiting for a round that is not there yet."""

from __future__ import annotations

import asyncio

import pytest
import torch

from mtl_node import wire
from mtl_node.core.errors import FetchError
from mtl_node.store import ModelStore


def model(value: float, n: int = 2) -> dict[str, torch.Tensor]:
    return {"w": torch.full((n,), value)}


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_publish_get_latest() -> None:
    store = ModelStore("a", keep_bytes=0, keep=8)
    assert store.latest_round == -1
    assert store.get(0) is None and store.get(1) is None
    for i in range(3):
        store.publish(i, model(float(i)))
    assert store.latest_round == 2
    got = store.get(1)
    assert got is not None and got.round == 1 and torch.equal(got.state["w"], model(1.0)["w"])
    assert store.get(3) is None


def test_round_zero_means_latest() -> None:
    store = ModelStore("a")
    store.publish(0, model(0.0))
    assert store.get(0) is not None and store.get(0).round == 0  # type: ignore[union-attr]
    store.publish(5, model(5.0))
    latest = store.get(0)
    assert latest is not None and latest.round == 5


def test_rounds_must_increase() -> None:
    store = ModelStore("a")
    store.publish(3, model(3.0))
    with pytest.raises(ValueError, match="already published"):
        store.publish(3, model(3.0))
    with pytest.raises(ValueError):
        store.publish(2, model(2.0))


def test_payload_is_encoded_once_and_decodes_back() -> None:
    store = ModelStore("a")
    published = store.publish(1, model(1.5))
    payload, digest = published.payload()
    again, digest2 = published.payload()
    assert again is payload and digest2 == digest == wire.digest(payload)
    assert torch.equal(wire.decode(payload, store.manifest)["w"], model(1.5)["w"])  # type: ignore[arg-type]


def test_wait_for_blocks_until_the_round_is_published() -> None:
    async def scenario() -> None:
        store = ModelStore("a")
        store.publish(0, model(0.0))
        waiter = asyncio.create_task(store.wait_for(2, timeout=60.0))
        await settle()
        assert not waiter.done()
        store.publish(1, model(1.0))
        await settle()
        assert not waiter.done()  # round 1 is not the round it waits for
        store.publish(2, model(2.0))
        published = await asyncio.wait_for(waiter, 60.0)
        assert published.round == 2 and torch.equal(published.state["w"], model(2.0)["w"])

    asyncio.run(scenario())


def test_wait_for_round_zero_waits_for_any_round() -> None:
    async def scenario() -> None:
        store = ModelStore("a")
        waiter = asyncio.create_task(store.wait_for(0, timeout=60.0))
        await settle()
        assert not waiter.done()
        store.publish(4, model(4.0))
        assert (await asyncio.wait_for(waiter, 60.0)).round == 4

    asyncio.run(scenario())


def test_wait_for_times_out() -> None:
    async def scenario() -> None:
        store = ModelStore("a")
        store.publish(1, model(1.0))
        with pytest.raises(FetchError) as exc:
            await store.wait_for(2, timeout=0.01)
        assert exc.value.reason == "timeout"
        assert "round 2" in str(exc.value)

    asyncio.run(scenario())


def test_expired_round() -> None:
    async def scenario() -> None:
        store = ModelStore("a", keep=2, keep_bytes=0)
        for i in range(1, 6):
            store.publish(i, model(float(i)))
        assert store.get(3) is None and store.get(4) is not None
        with pytest.raises(FetchError) as exc:
            await store.wait_for(3, timeout=60.0)
        assert exc.value.reason == "expired"
        assert (await store.wait_for(5, timeout=60.0)).round == 5

    asyncio.run(scenario())


def test_close_wakes_waiters() -> None:
    async def scenario() -> None:
        store = ModelStore("a")
        waiter = asyncio.create_task(store.wait_for(1, timeout=60.0))
        await settle()
        store.close()
        with pytest.raises(FetchError) as exc:
            await asyncio.wait_for(waiter, 60.0)
        assert exc.value.reason == "unavailable"

    asyncio.run(scenario())


def test_keep_bytes_keeps_many_rounds_of_tiny_models() -> None:
    store = ModelStore("a", keep=4, keep_bytes=1 << 20)
    for i in range(1, 301):
        store.publish(i, model(float(i)))  # 8 bytes a round
    assert store.keep == (1 << 20) // 8
    assert all(store.get(i) is not None for i in range(1, 301))


def test_keep_bytes_keeps_few_rounds_of_large_models() -> None:
    big = 1 << 18  # float32: 1 MiB a round
    store = ModelStore("a", keep=2, keep_bytes=3 << 20)
    for i in range(1, 11):
        store.publish(i, model(float(i), big))
    assert store.keep == 3
    assert [i for i in range(1, 11) if store.get(i) is not None] == [8, 9, 10]

    # The minimum is kept whatever the budget.
    store = ModelStore("a", keep=2, keep_bytes=1)
    for i in range(1, 6):
        store.publish(i, model(float(i), big))
    assert [i for i in range(1, 6) if store.get(i) is not None] == [4, 5]
