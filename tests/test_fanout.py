"""The coalesced fan-out path: order, compression, and the library's own writes."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from bench.wsclient import WSPeer
from node import protocol
from node.transports.websocket import CompressedLink, WebSocketLink
from tests.conftest import NodeFactory
from tests.helpers import data_frame, insecure, join_frame, joined, recv


async def _collect(ws, n: int) -> list[str]:  # type: ignore[no-untyped-def]
    out: list[str] = []
    while len(out) < n:
        msg = await recv(ws, timeout=10)
        if msg["t"] == "data":
            out.append(msgpack.unpackb(msg["pl"])["data"])
    return out


async def test_burst_arrives_complete_and_in_order_between_pings(
        node_factory: NodeFactory) -> None:
    # 500 at once is a flood by the default RATE_BURST (400): no rate limit here.
    node = await node_factory(PING_INTERVAL="0.05", PING_TIMEOUT="5", RATE_LIMIT="0")
    sender = await joined(node, "room", "sender")
    readers = [await joined(node, "room", f"r{i}") for i in range(5)]
    n = 500
    tasks = [asyncio.create_task(_collect(r, n)) for r in readers]
    for i in range(n):  # no awaits between sends: they reach the node in big batches
        await sender.send(data_frame("room", "m", f"{i}"))
    for got in await asyncio.gather(*tasks):
        assert got == [str(i) for i in range(n)]
    assert "undeliverable" not in node.node.presence.dropped


async def test_compressed_and_plain_peers_get_the_same_messages(
        node_factory: NodeFactory) -> None:
    node = await node_factory(WS_COMPRESSION="true")
    sender = await joined(node, "room", "sender")
    zipped = await joined(node, "room", "zipped", compression="deflate")
    plain = await joined(node, "room", "plain", compression=None)
    kinds = {p.client_id: type(node.node.links[p.sid]) for p in node.node.presence.peers.values()}
    assert kinds["zipped"] is CompressedLink and kinds["plain"] is WebSocketLink
    tasks = [asyncio.create_task(_collect(ws, 100)) for ws in (zipped, plain)]
    for i in range(100):
        await sender.send(data_frame("room", "m", f"{i}" * 50))
    a, b = await asyncio.gather(*tasks)
    assert a == b == [f"{i}" * 50 for i in range(100)]


@pytest.mark.parametrize("how", ["close", "ping"])
async def test_queued_frames_go_out_before_the_librarys_own_writes(
        node_factory: NodeFactory, how: str) -> None:
    node = await node_factory()
    got: list[bytes] = []
    ws = await WSPeer.connect("127.0.0.1", node.port, WSPeer.v1_path("alice"), "alice",
                              ssl=insecure(), on_message=lambda _, m: got.append(bytes(m)))
    ws.send(join_frame("room", "alice"))
    await ws.wait_count(1)
    (peer,) = node.node.presence.peers.values()
    link = node.node.links[peer.sid]
    frame = protocol.encode_data("room", "m", '"first"', p="server")
    assert link.send(frame)  # queued for the end of this loop turn...
    if how == "close":
        await link.ws.close(1001, "bye")  # ...and the close frame must follow it
        await asyncio.wait_for(ws.lost, 5)
        assert got[1:] == [frame] and ws.close_code == 1001
        assert not link.send(frame)  # closing: refused, never queued after the close
    else:
        pong = await link.ws.ping(b"12345678")  # answered by WSPeer
        await asyncio.wait_for(pong, 5)
        await ws.wait_count(2)
        assert got[1:] == [frame]
        ws.close()
