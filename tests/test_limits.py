"""Every limit on a real node, over WebSocket and WebTransport: what the offender gets,
and that the other peers carry on as if nothing happened."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

import msgpack
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.protoclient import ProtoClient
from tests.conftest import NodeFactory, RunningNode
from tests.helpers import (
    barrier,
    data_frame,
    insecure,
    join_frame,
    joined,
    peer,
    recv,
    still_served,
)
from tests.mesh_helpers import wait_until
from tests.wt_client import wt_connect


async def close_of(ws, timeout: float = 5.0) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """Read until the server closes; the close code and reason it sent."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed):
        while time.monotonic() < deadline:
            await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
    rcvd = ws.protocol.close_rcvd
    assert rcvd is not None, "closed without a close frame"
    return rcvd.code, rcvd.reason


async def offline_seen(ws, who: str, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        msg = await recv(ws, deadline - time.monotonic())
        if msg.get("op") == "peer_offline" and msg.get("p") == who:
            return


# -- message rate -----------------------------------------------------------------------


async def test_rate_limit_drops_the_excess_then_closes_a_flood(
        node_factory: NodeFactory) -> None:
    node = await node_factory(RATE_LIMIT="20", RATE_BURST="20")
    flooder = await joined(node, "room", "flooder")  # (the join used one token)
    reader = await joined(node, "room", "reader")
    calm = await joined(node, "room", "calm")
    got: list[str] = []

    async def collect() -> None:
        while True:
            msg = await recv(reader, 10)
            if msg.get("t") == "data" and msg["p"] == "flooder":
                got.append(msgpack.unpackb(msg["pl"])["data"])

    collector = asyncio.create_task(collect())
    for i in range(30):  # a burst over RATE_BURST: the excess is dropped, not queued
        await flooder.send(data_frame("room", "m", str(i)))
    dropped = node.node.presence.dropped
    await wait_until(lambda: len(got) + dropped["rate_limited"] == 30, 5, "all 30 handled")
    collector.cancel()
    assert got == [str(i) for i in range(len(got))] and 15 <= len(got) <= 21
    # A sustained flood (far over twice the rate) is closed with 1008 and a reason.
    with pytest.raises(ConnectionClosed):
        for i in range(5000):
            await flooder.send(data_frame("room", "m", f"f{i}"))
            if i % 50 == 0:
                await asyncio.sleep(0)
    code, reason = await close_of(flooder)
    assert (code, reason) == (1008, "message rate over 20/s")
    await offline_seen(reader, "flooder")  # gone for the others at once
    assert dropped["rate_flood"] == 1
    # The others were never limited and carry on.
    await barrier(calm, reader, "room")
    await still_served(node)
    for ws in (flooder, reader, calm):  # reader has flood frames it never read: a
        ws.transport.abort()  # close handshake would wait for its close timeout


async def test_a_join_storm_is_not_rate_limited(node_factory: NodeFactory) -> None:
    """Thirty real-client-like peers join one channel at once with RATE_LIMIT=2/s: each
    answers ~30 peer_online with peer_state in a second. Those answers are credited."""
    node = await node_factory(RATE_LIMIT="2", RATE_BURST="3")
    clients = [ProtoClient(node.ws_base, f"c{i}") for i in range(30)]
    await asyncio.gather(*(c.connect() for c in clients))
    await asyncio.gather(*(c.join("storm") for c in clients))
    everyone = {c.cid for c in clients}

    def complete() -> bool:
        return all(set(c.members) == everyone - {c.cid} and all(c.members.values())
                   for c in clients)

    await wait_until(complete, 10, "every client to list every other with its state")
    assert node.node.presence.dropped["rate_limited"] == 0
    await asyncio.gather(*(c.close() for c in clients))


# -- channels per peer, peers per channel -------------------------------------------------


async def test_too_many_channels_closes_4008_and_others_carry_on(
        node_factory: NodeFactory) -> None:
    node = await node_factory(MAX_CHANNELS_PER_PEER="2")
    greedy = await joined(node, "one", "greedy")
    other = await joined(node, "one", "other")
    await greedy.send(join_frame("two", "greedy"))
    assert (await recv(greedy))["op"] == "channel_join"
    await greedy.send(join_frame("three", "greedy"))
    code, reason = await close_of(greedy)
    assert code == 4008 and reason == "too many channels: at most 2 per connection"
    await offline_seen(other, "greedy")
    assert node.node.presence.dropped["too_many_channels"] == 1
    await still_served(node)


async def test_a_full_channel_closes_the_next_joiner_4008(node_factory: NodeFactory) -> None:
    node = await node_factory(MAX_PEERS_PER_CHANNEL="2")
    a = await joined(node, "room", "a")
    b = await joined(node, "room", "b")
    c = await peer(node, "c")
    await c.send(join_frame("room", "c"))
    code, reason = await close_of(c)
    assert code == 4008 and reason.startswith("channel full: at most 2 peers")
    await barrier(a, b, "room")  # the two inside never heard of c
    other = await joined(node, "elsewhere", "c2")  # other channels are not full
    await other.close()
    assert node.node.presence.dropped["channel_full"] == 1


# -- connections --------------------------------------------------------------------------


async def test_connection_limit_answers_503_at_the_handshake(node_factory: NodeFactory) -> None:
    node = await node_factory(MAX_CONNECTIONS="2")
    a = await joined(node, "room", "a")
    b = await joined(node, "room", "b")
    with pytest.raises(InvalidStatus) as err:
        await peer(node, "c")
    assert err.value.response.status_code == 503
    assert b"2 connections" in err.value.response.body
    await barrier(a, b, "room")
    async with wt_connect(node.port, "/v1?publickey=k&id=w") as wt:
        assert wt.status == 503
    await b.close()
    await wait_until(lambda: len(node.node.presence.peers) == 1, 5, "b gone")
    c = await joined(node, "room", "c")  # a free slot again
    await barrier(a, c, "room")


# -- handshakes ---------------------------------------------------------------------------


def _raw(port: int, tls: bool) -> socket.socket | ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if tls:
        return insecure().wrap_socket(sock, server_hostname="localhost")
    return sock


def _closed_by_server(sock: socket.socket, within: float) -> float:
    """Seconds until the server closes ``sock`` (it sends nothing first)."""
    t0 = time.monotonic()
    sock.settimeout(within)
    try:
        data = sock.recv(4096)
    except (ConnectionResetError, ssl.SSLError, OSError):
        data = b""
    assert data == b"", data[:200]
    return time.monotonic() - t0


async def test_handshake_timeout_drops_silent_tls_and_http(node_factory: NodeFactory) -> None:
    node = await node_factory(HANDSHAKE_TIMEOUT="0.5")
    silent_tcp = socket.create_connection(("127.0.0.1", node.port))  # no TLS hello
    tls_only = await asyncio.to_thread(_raw, node.port, True)  # TLS done, no request
    slow = await asyncio.to_thread(_raw, node.port, True)
    slow.sendall(b"GET /v1?publickey=k&id=s HTTP/1.1\r\nHost: x\r\n")  # never finished
    a = await joined(node, "room", "a")  # others connect and talk meanwhile
    b = await joined(node, "room", "b")
    waits = await asyncio.gather(*(asyncio.to_thread(_closed_by_server, s, 5)
                                   for s in (silent_tcp, tls_only, slow)))
    assert all(w < 2.5 for w in waits), waits
    for s in (silent_tcp, tls_only, slow):
        s.close()
    await barrier(a, b, "room")


async def test_quic_connection_without_a_session_is_closed(node_factory: NodeFactory) -> None:
    node = await node_factory(HANDSHAKE_TIMEOUT="0.5")
    async with wt_connect(node.port) as idle:  # QUIC + HTTP/3 SETTINGS, never a CONNECT
        t0 = time.monotonic()
        await idle.until(lambda: idle.terminated is not None, 5, "the server to close")
        assert time.monotonic() - t0 < 2.5
    assert node.node.presence.dropped["handshake_timeout"] == 1
    async with wt_connect(node.port, "/v1?publickey=k&id=w") as wt:  # a real one stays
        assert wt.status == 200
        await asyncio.sleep(1.0)
        assert wt.terminated is None


@pytest.mark.parametrize(("request_head", "status"), [
    (b"GET /v1?publickey=k&id=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /v1?publickey=k&id=a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
     431),
    (b"GET /v1?publickey=k&id=a HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"X-H%d: v\r\n" % i for i in range(70)) + b"\r\n", 431),
])
async def test_oversized_request_heads_get_a_clear_4xx(
        node_factory: NodeFactory, request_head: bytes, status: int) -> None:
    node = await node_factory()

    def ask() -> bytes:
        with _raw(node.port, True) as sock:
            sock.sendall(request_head)
            sock.settimeout(5)
            return sock.recv(4096)

    reply = await asyncio.to_thread(ask)
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:100]
    await still_served(node)


async def test_oversized_header_over_http3_gets_431(node_factory: NodeFactory) -> None:
    node = await node_factory(HTTP_MAX_LINE="200")
    async with wt_connect(node.port, "/v1?publickey=k&id=" + "x" * 300) as wt:
        assert wt.status == 431
    async with wt_connect(node.port, "/v1?publickey=k&id=ok") as wt:
        assert wt.status == 200


# -- the same limits over WebTransport ------------------------------------------------------


async def test_webtransport_flood_is_closed_1008_and_full_channel_4008(
        node_factory: NodeFactory) -> None:
    node: RunningNode = await node_factory(RATE_LIMIT="20", RATE_BURST="20",
                                           MAX_PEERS_PER_CHANNEL="2")
    reader = await joined(node, "room", "reader")
    async with wt_connect(node.port, "/v1?publickey=k&id=wt") as wt:
        wt.send_datagram(join_frame("room", "wt"))
        await wt.next_message(match=lambda m: m.get("op") == "channel_join")
        for i in range(2000):
            wt.send_datagram(data_frame("room", "m", str(i)))
            if i % 20 == 0:
                await asyncio.sleep(0.001)
            if wt.close_capsule is not None:
                break
        await wt.until(lambda: wt.close_capsule is not None, 5, "the close capsule")
        assert wt.close_capsule == (1008, "message rate over 20/s")
    await offline_seen(reader, "wt")
    b = await joined(node, "room", "b")
    async with wt_connect(node.port, "/v1?publickey=k&id=third") as wt:
        wt.send_datagram(join_frame("room", "third"))
        await wt.until(lambda: wt.close_capsule is not None, 5, "the close capsule")
        assert wt.close_capsule[0] == 4008 and "channel full" in wt.close_capsule[1]
    await barrier(reader, b, "room")
