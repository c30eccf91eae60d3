"""A closed connection is freed when it closes, not at the next full garbage collection.

Under churn, what waits for the cyclic collector piles up: the collector's oldest
generation runs only when it has grown by a quarter, and what it frees leaves pymalloc
arenas half used. bench/soak.py showed the node's RSS creeping ~1 MiB a minute that way
(docs/soak.md). Here the collector is off: a connection's objects must go by reference
counting alone, however the peer left.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Iterator

import pytest

from tests.conftest import RunningNode
from tests.helpers import control, joined
from tests.mesh_helpers import wait_until


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_closed_peers_are_freed_without_the_cyclic_collector(
        node: RunningNode, no_cyclic_gc: None) -> None:
    ways = ["close", "close", "abort", "abort", "leave", "leave"]
    clients = [await joined(node, "room", f"p{i}") for i in range(len(ways))]
    # The node's side of each connection: the connection, its protocol, its reader.
    refs = [weakref.ref(obj) for link in node.node.links.values()
            for obj in (link.ws, link.ws.protocol, link.ws.protocol.reader)]
    assert len(refs) == 3 * len(ways)
    for ws, way in zip(clients, ways, strict=True):
        if way == "abort":  # the peer vanishes: no closing handshake, EOF on the node
            ws.transport.abort()
        else:
            if way == "leave":
                await ws.send(control("peer_offline", "room"))
            await ws.close()
    await wait_until(lambda: not node.node.links, what="every peer closed on the node")
    alive = await _survivors(refs)
    assert not alive, f"alive after close without the cyclic GC: {alive}"


async def _survivors(refs: list[weakref.ref[object]]) -> list[str]:
    def alive() -> list[str]:
        return [type(obj).__name__ for ref in refs if (obj := ref()) is not None]

    with contextlib.suppress(AssertionError):  # the assertion names what stayed
        await wait_until(lambda: not alive(), timeout=5.0, what="closed connections freed")
    return alive()
