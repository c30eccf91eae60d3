"""Stop never waits on one stuck peer.

A WebSocket peer that stopped reading, its write buffer full, used to hold the node's stop
until the 4.5 s cap of node/cli.py: the listener's close waited for each connection's
closing handshake, and the library's close first waits for the write buffer to drain.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from bench.wsclient import WSPeer
from tests.conftest import NodeFactory
from tests.helpers import data_frame, insecure, join_frame, joined, recv
from tests.mesh_helpers import NatsServer, wait_until


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server (tests/mesh/conftest.py has the same; its fixtures stay there)."""
    server = NatsServer(tmp_path, "nats").start()
    yield server
    server.kill()


async def test_stop_aborts_a_peer_that_never_reads_and_the_others_get_1001(
        node_factory: NodeFactory, nats_server: NatsServer) -> None:
    # The backlog limit far above what the test queues: only stop closes the slow peer.
    a = await node_factory(MESH_ID="east", NATS_URL=nats_server.url,
                           WRITE_BUFFER_LIMIT=str(64 * 1024 * 1024))
    b = await node_factory(MESH_ID="west", NATS_URL=nats_server.url)
    await wait_until(lambda: a.node.liveness.nodes and b.node.liveness.nodes, 5, "mesh")
    watcher = await joined(b, "room", "watcher", ping_interval=None)
    normal = await joined(a, "room", "normal", ping_interval=None)
    await normal.send(join_frame("fill", "normal"))
    assert (await recv(normal))["c"] == "fill"

    slow = await WSPeer.connect("127.0.0.1", a.port, WSPeer.v1_path("slow", "key"), "slow",
                                ssl=insecure())
    slow.send(join_frame("room", "slow"))
    slow.send(join_frame("fill", "slow"))
    await slow.wait_count(2)
    slow.stop_reading()
    (server_side,) = [p for p in a.node.presence.peers.values() if p.client_id == "slow"]
    transport = a.node.links[server_side.sid].ws.transport  # type: ignore[attr-defined]
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    # Fill its buffer well past the library's high-water mark (32 KiB): its close would
    # wait for a drain that never comes.
    body = "x" * 8000
    for i in range(200):
        await normal.send(data_frame("fill", "m", f'"{i:04d}{body}"'))
    await wait_until(lambda: transport.get_write_buffer_size() > 256 * 1024, 10,
                     "the slow peer's write buffer full")

    started = time.monotonic()
    async with asyncio.timeout(6):  # (the bug: forever, capped at 4.5 s by node/cli.py)
        await a.app.stop()
    took = time.monotonic() - started
    print(f"stop took {took:.3f}s")
    assert took < 2.0, f"stop took {took:.2f}s"

    await asyncio.wait_for(normal.wait_closed(), 5)
    assert normal.close_code == 1001
    # Aborted (it reads nothing, so only the node's side can tell).
    assert transport.is_closing() and not a.node.links

    offline: set[str] = set()
    async with asyncio.timeout(10):
        while offline != {"normal", "slow"}:
            got = msgpack.unpackb(await watcher.recv())
            if got.get("op") == "peer_offline":
                offline.add(got["p"])
    assert a.node.presence.dropped.get("slow_reader", 0) == 0  # closed by stop, not the guard
    await watcher.close()
    slow.close()
