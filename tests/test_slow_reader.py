"""A peer that stops reading is closed with 1008 once WRITE_BUFFER_LIMIT bytes are queued
for it; the other peers keep receiving everything, in order, and hear it go offline."""

from __future__ import annotations

import asyncio
import socket

import msgpack
from websockets.asyncio.client import ClientConnection

from bench.wsclient import WSPeer
from tests.conftest import NodeFactory
from tests.helpers import data_frame, insecure, join_frame, joined
from tests.wt_client import wt_connect

LIMIT = 64 * 1024


async def send_and_read(sender: ClientConnection, reader: ClientConnection, n: int,
                        body: str) -> tuple[list[str], list[str]]:
    """Send n numbered messages; read them all at ``reader`` and the peer_offline seen."""
    got: list[str] = []
    offline: list[str] = []

    async def read_all() -> None:
        while len(got) < n or not offline:
            msg = msgpack.unpackb(await asyncio.wait_for(reader.recv(), 10))
            if msg["t"] == "data":
                got.append(msgpack.unpackb(msg["pl"])["data"])
            elif msg.get("op") == "peer_offline":
                offline.append(msg["p"])

    reading = asyncio.create_task(read_all())
    for i in range(n):
        await sender.send(data_frame("room", "m", f"{i:04d}{body}"))
    await asyncio.wait_for(reading, 20)
    assert [g[:4] for g in got] == [f"{i:04d}" for i in range(n)]  # all of them, in order
    return got, offline


async def test_slow_reader_is_closed_1008_and_others_keep_receiving(
        node_factory: NodeFactory) -> None:
    node = await node_factory(WRITE_BUFFER_LIMIT=str(LIMIT))
    sender = await joined(node, "room", "sender", ping_interval=None)
    reader = await joined(node, "room", "reader", ping_interval=None)
    slow = await WSPeer.connect("127.0.0.1", node.port, WSPeer.v1_path("slow", "key"), "slow",
                                ssl=insecure())
    slow.send(join_frame("room", "slow"))
    await slow.wait_count(1)
    # Small socket buffers on both ends so the backlog lands in the node's own buffer fast.
    assert slow.transport is not None
    slow.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    slow.stop_reading()
    (server_side,) = [p for p in node.node.presence.peers.values() if p.client_id == "slow"]
    link = node.node.links[server_side.sid]
    link.ws.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    body = "x" * 8000  # 200 of them, 1.6 MB in all: far past the limit
    _, offline = await send_and_read(sender, reader, 200, body)
    assert offline == ["slow"]
    assert node.node.presence.dropped["slow_reader"] == 1
    assert "slow" not in {p.client_id for p in node.node.presence.peers.values()}
    # Its queue stayed bounded: at most the limit plus what one loop turn added.
    assert link.ws.transport.get_write_buffer_size() < LIMIT + 2 * len(body) * 8

    # A slow but live reader that catches up sees why it was closed.
    assert slow.transport is not None
    slow.transport.resume_reading()
    await asyncio.wait_for(slow.lost, 10)
    assert slow.close_code == 1008
    assert slow.close_reason.startswith("slow reader: ") and "bytes queued" in slow.close_reason
    await sender.close()
    await reader.close()


async def test_webtransport_slow_reader_is_closed_1008_like_a_websocket_one(
        node_factory: NodeFactory) -> None:
    """A datagram peer that stops acknowledging (killed, or its network gone) piles up
    datagrams in aioquic's queue: past the limit it is closed 1008 and offline at once,
    not kept (growing) until its idle timeout, and nothing is dropped silently before."""
    node = await node_factory(WEBTRANSPORT="true", WRITE_BUFFER_LIMIT=str(LIMIT), RATE_LIMIT="0")
    sender = await joined(node, "room", "sender", ping_interval=None)
    reader = await joined(node, "room", "reader", ping_interval=None)
    async with wt_connect(node.port, "/v1?publickey=key&id=slow") as wt:
        wt.send_datagram(join_frame("room", "slow"))
        await wt.next_message(match=lambda m: m.get("op") == "channel_join")
        wt.vanish()
        # 300 of them, each fitting one datagram: 270 KB in all.
        _, offline = await send_and_read(sender, reader, 300, "x" * 900)
    assert offline == ["slow"]
    dropped = node.node.presence.dropped
    assert dropped["slow_reader"] == 1 and dropped["undeliverable"] == 0
    assert "slow" not in {p.client_id for p in node.node.presence.peers.values()}
