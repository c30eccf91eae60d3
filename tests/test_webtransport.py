"""The WebTransport transport over real UDP sockets, driven by an aioquic client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import ClientConnection

from node.transports.webtransport import WebTransportListener
from tests.conftest import NodeFactory, RunningNode
from tests.helpers import control, data_frame, join_frame, joined, pack, recv
from tests.wt_client import WTClient, wt_connect

WT = {"WEBTRANSPORT": "true"}


def path(client_id: str, key: str = "key") -> str:
    return f"/v1?publickey={key}&id={client_id}"


def wt_transport(node: RunningNode) -> WebTransportListener:
    return next(t for t in node.app.listeners if isinstance(t, WebTransportListener))


async def ws_until(ws: ClientConnection, match: Callable[[dict[str, Any]], bool],
                   timeout: float = 5.0) -> dict[str, Any]:
    """Read the WebSocket peer's frames until one matches (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("timed out waiting for a matching WebSocket frame")
        message = await recv(ws, remaining)
        if match(message):
            return message


def is_op(op: str, p: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("op") == op and m.get("p") == p


def event_of(message: dict[str, Any]) -> str | None:
    if message.get("t") != "data":
        return None
    return msgpack.unpackb(message["pl"])["event"]


async def wt_join(wt: WTClient, channel: str, client_id: str, *, reliable: bool = False,
                  **state: Any) -> None:
    """Join as the real client does: channel_join, then (after the ack) online + state."""
    send = wt.send_stream if reliable else wt.send_datagram
    send(join_frame(channel, client_id, **state))
    ack = await wt.next_message(match=lambda m: m.get("op") == "channel_join")
    assert ack == {"t": "control", "op": "channel_join", "c": channel, "mesh": "local"}
    send(control("peer_online", channel))
    send(control("peer_state", channel, pack({"id": client_id, **state})))


# -- sessions, datagrams, streams ------------------------------------------------------

async def test_websocket_and_webtransport_peers_share_a_channel(
        node_factory: NodeFactory) -> None:
    node = await node_factory(**WT)
    ws = await joined(node, "room", "wsa")
    async with wt_connect(node.port, path("wtb")) as wt:
        assert wt.status == 200
        assert wt.headers[b"x-prscd-meshid"] == b"local"
        await wt_join(wt, "room", "wtb", name="Bob")
        await ws_until(ws, is_op("peer_online", "wtb"))
        state = await ws_until(ws, is_op("peer_state", "wtb"))
        assert msgpack.unpackb(state["pl"]) == {"id": "wtb", "name": "Bob"}
        # WebSocket -> WebTransport (a datagram), and back.
        await ws.send(data_frame("room", "hello", '"from ws"'))
        via, got = await wt.next_via()
        assert via == "datagram" and got["p"] == "wsa" and event_of(got) == "hello"
        wt.send_datagram(data_frame("room", "cursor", '{"x":1}'))
        got = await ws_until(ws, lambda m: m.get("t") == "data")
        assert got["p"] == "wtb" and event_of(got) == "cursor"
        peers = {p.client_id: p.transport for p in node.node.presence.peers.values()}
        assert peers == {"wsa": "websocket", "wtb": "webtransport"}
    await ws.close()


async def test_two_webtransport_peers_exchange_datagrams(node_factory: NodeFactory) -> None:
    node = await node_factory(**WT)
    async with wt_connect(node.port, path("a")) as a, wt_connect(node.port, path("b")) as b:
        await wt_join(a, "room", "a")
        await wt_join(b, "room", "b")
        await a.next_message(match=lambda m: m.get("op") == "peer_online" and m["p"] == "b")
        b.send_datagram(data_frame("room", "e", '"1"'))
        got = await a.next_message(match=lambda m: m.get("t") == "data")
        assert a.messages[a.read - 1][0] == "datagram"
        assert got["p"] == "b" and event_of(got) == "e"
    counters = wt_transport(node).counters
    assert counters["datagrams_in"] >= 7 and counters["datagrams_out"] >= 4


async def test_reliable_stream_peer_is_answered_on_a_stream(node_factory: NodeFactory) -> None:
    node = await node_factory(**WT)
    ws = await joined(node, "room", "wsa")
    async with wt_connect(node.port, path("rel")) as wt:
        # Two maps in one write, then one map split across two writes.
        join = join_frame("room", "rel")
        wt.send_stream(join + control("peer_online", "room"))
        ack = await wt.next_message()
        assert ack["op"] == "channel_join"
        assert wt.messages[0][0] == "stream"
        state = control("peer_state", "room", pack({"id": "rel", "mood": "calm"}))
        wt.send_stream(state[:5])
        wt.send_stream(state[5:])
        got = await ws_until(ws, is_op("peer_state", "rel"))
        assert msgpack.unpackb(got["pl"])["mood"] == "calm"
        await ws.send(data_frame("room", "hi", '"there"'))
        via, got = await wt.next_via()
        assert via == "stream" and event_of(got) == "hi"
        assert wt_transport(node).counters["datagrams_out"] == 0
    await ws_until(ws, is_op("peer_offline", "rel"))
    await ws.close()


async def test_oversize_message_goes_on_a_stream_and_blocks_nothing(
        node_factory: NodeFactory) -> None:
    node = await node_factory(**WT)
    ws = await joined(node, "room", "wsa")
    async with wt_connect(node.port, path("dg")) as wt:
        await wt_join(wt, "room", "dg")
        session = next(iter(next(iter(wt_transport(node).connections)).sessions.values()))
        room = session.io.datagram_room(session.session_id)
        assert room == 1169  # aioquic's default 1200-byte packets, 8-byte connection ids
        await ws.send(data_frame("room", "big", json.dumps("x" * 5000)))
        await ws.send(data_frame("room", "small", '"y"'))
        arrived = [await wt.next_via(), await wt.next_via()]
        by_event = {event_of(m): via for via, m in arrived}
        assert by_event == {"big": "stream", "small": "datagram"}
        big = next(m for _, m in arrived if event_of(m) == "big")
        assert json.loads(msgpack.unpackb(big["pl"])["data"]) == "x" * 5000
        # Later datagrams still flow (an oversized datagram would have blocked them).
        for i in range(5):
            await ws.send(data_frame("room", "n", json.dumps(i)))
            via, _ = await wt.next_via()
            assert via == "datagram"
    assert wt_transport(node).counters["stream_fallback"] == 1
    assert "undeliverable" not in node.node.presence.dropped
    await ws.close()


# -- CONNECT rules ---------------------------------------------------------------------

@pytest.mark.parametrize(("connect_path", "kw", "status"), [
    ("/v1?publickey=key", {}, 401),
    ("/v1?id=alice", {}, 401),
    ("/v1?publickey=wrong&id=alice", {}, 403),
    ("/elsewhere?publickey=good&id=alice", {}, 404),
    ("/v1?publickey=good&id=alice", {"protocol": b"websocket"}, 400),
    ("/v1?publickey=good&id=alice", {"scheme": b"http"}, 400),
])
async def test_bad_connect_is_refused_with_a_status(
        node_factory: NodeFactory, connect_path: str, kw: dict[str, Any], status: int) -> None:
    node = await node_factory(PUBLIC_KEYS="good:app", **WT)
    async with wt_connect(node.port, connect_path, **kw) as wt:
        assert wt.status == status
        assert wt.headers[b"x-prscd-meshid"] == b"local"
        await wt.until(lambda: wt.session_fin, what="end of the refused stream")
        assert wt.body.strip()
    assert not node.node.presence.peers


async def test_plain_get_over_http3_serves_the_node_pages(node_factory: NodeFactory) -> None:
    """Chromium with --origin-to-force-quic-on loads the demo pages over HTTP/3."""
    node = await node_factory(MESH_ID="eu-west", **WT)
    async with wt_connect(node.port, "/health", method=b"GET") as wt:
        await wt.until(lambda: wt.session_fin, what="the response body")
        assert wt.status == 200 and wt.headers[b"x-prscd-meshid"] == b"eu-west"
        assert json.loads(wt.body)["mesh_id"] == "eu-west"


async def test_listens_on_ipv6_loopback_too(node_factory: NodeFactory) -> None:
    node = await node_factory(**WT)
    assert ("::1", node.port) in [a[:2] for a in node.app.addresses]
    async with wt_connect(node.port, path("six"), host="::1") as wt:
        assert wt.status == 200


# -- how sessions end ------------------------------------------------------------------

def _end(how: str) -> Callable[[WTClient], None]:
    return {
        "capsule": lambda wt: wt.close_session(0, "tab closed"),
        "fin": lambda wt: wt.fin_session(),
        "reset": lambda wt: wt.reset_session(0x10C),
        "connection_close": lambda wt: wt.close(),
        "vanish": lambda wt: wt.vanish(),
    }[how]


@pytest.mark.parametrize("how", ["capsule", "fin", "reset", "connection_close", "vanish"])
async def test_every_way_a_session_ends_sends_peer_offline(
        node_factory: NodeFactory, how: str) -> None:
    node = await node_factory(WT_IDLE_TIMEOUT="1", WT_PING_INTERVAL="0.3", **WT)
    ws = await joined(node, "room", "watcher")
    async with wt_connect(node.port, path("leaver")) as wt:
        await wt_join(wt, "room", "leaver")
        await ws_until(ws, is_op("peer_online", "leaver"))
        started = time.monotonic()
        _end(how)(wt)
        await ws_until(ws, is_op("peer_offline", "leaver"), timeout=5)
        elapsed = time.monotonic() - started
    assert [p.client_id for p in node.node.presence.peers.values()] == ["watcher"]
    if how != "vanish":
        assert elapsed < 1.0, f"{how}: offline after {elapsed:.2f}s"
    await ws.close()


async def test_pings_keep_a_quiet_session_alive(node_factory: NodeFactory) -> None:
    node = await node_factory(WT_IDLE_TIMEOUT="0.6", WT_PING_INTERVAL="0.15", **WT)
    async with wt_connect(node.port, path("quiet")) as wt:
        await wt_join(wt, "room", "quiet")
        await asyncio.sleep(2.0)  # several idle timeouts of silence from the client
        assert wt.terminated is None and wt.close_capsule is None
        [peer] = node.node.presence.peers.values()
        assert peer.client_id == "quiet" and peer.rtt_ms is not None  # from QUIC's estimate


async def test_node_stop_closes_the_connection_so_the_client_reconnects(
        node_factory: NodeFactory) -> None:
    # Chromium's WebTransport rejects `closed` on a CONNECTION_CLOSE, and @yomo/presence
    # reconnects on that (after 10 s); a close capsule would end it for good.
    node = await node_factory(**WT)
    async with wt_connect(node.port, path("stay")) as wt:
        await wt_join(wt, "room", "stay")
        await node.app.stop()
        await wt.until(lambda: wt.terminated is not None, what="the CONNECTION_CLOSE")
        assert wt.terminated.error_code == 0x100  # H3_NO_ERROR
        assert wt.terminated.reason_phrase == "node stopping"
        assert wt.close_capsule is None
    assert not node.node.presence.peers


async def test_node_stop_closes_sessions_with_a_capsule(node_factory: NodeFactory) -> None:
    node = await node_factory(WT_STOP_CLOSE="capsule", **WT)
    async with wt_connect(node.port, path("stay")) as wt:
        await wt_join(wt, "room", "stay")
        await node.app.stop()
        await wt.until(lambda: wt.close_capsule is not None, what="the close capsule")
        assert wt.close_capsule == (1001, "node stopping") and wt.session_fin
    assert not node.node.presence.peers


# -- bad input closes that session only ------------------------------------------------

BAD_INPUT: dict[str, tuple[Callable[[WTClient], None], int, str]] = {
    "datagram not msgpack": (lambda wt: wt.send_datagram(b"\xc1"), 1007, "not valid msgpack"),
    "datagram not a map": (lambda wt: wt.send_datagram(pack([1, 2])), 1007, "must be a msgpack map"),
    "stream not msgpack": (lambda wt: wt.send_stream(b"\xc1"), 1007, "not valid msgpack"),
    "stream ends mid-message": (
        lambda wt: wt.send_stream(join_frame("room", "x")[:6], end=True), 1007, "inside a message"),
    "stream message too big": (
        lambda wt: wt.send_stream(pack({"t": "data", "c": "r", "pl": b"x" * 70_000})),
        1009, "larger than 65536"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
async def test_bad_input_closes_only_that_session(node_factory: NodeFactory, case: str) -> None:
    node = await node_factory(**WT)
    send_bad, code, reason = BAD_INPUT[case]
    async with wt_connect(node.port, path("good")) as good, \
            wt_connect(node.port, path("bad")) as bad:
        await wt_join(good, "room", "good")
        await wt_join(bad, "room", "bad")
        await good.next_message(match=is_op("peer_online", "bad"))
        send_bad(bad)
        await bad.until(lambda: bad.close_capsule is not None, what="the close capsule")
        assert bad.close_capsule[0] == code and reason in bad.close_capsule[1], bad.close_capsule
        await good.next_message(match=is_op("peer_offline", "bad"))
        # The other session is untouched.
        good.send_datagram(data_frame("room", "still", '"here"'))
        async with wt_connect(node.port, path("late")) as late:
            await wt_join(late, "room", "late")
            good.send_datagram(data_frame("room", "hi", '"late"'))
            got = await late.next_message(match=lambda m: m.get("t") == "data")
            assert got["p"] == "good"
    assert sum(node.node.presence.dropped[r] for r in ("invalid", "too_big")) == 1


async def test_a_reset_data_stream_loses_only_its_partial_message(
        node_factory: NodeFactory) -> None:
    node = await node_factory(**WT)
    async with wt_connect(node.port, path("rs")) as wt:
        await wt_join(wt, "room", "rs", reliable=True)
        first = wt.send_stream(join_frame("room", "rs")[:4])
        wt.reset_stream(first)
        wt.send_stream(join_frame("other", "rs"), new=True)
        ack = await wt.next_message(match=lambda m: m.get("op") == "channel_join")
        assert ack["c"] == "other"
    assert node.node.presence.dropped["wt_stream_reset"] == 1


async def test_port_zero_takes_another_port_when_its_udp_twin_is_busy(
        node_factory: NodeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """PORT=0: the kernel picks a free TCP port, whose UDP twin may be taken (seen in CI:
    EADDRINUSE at start). The node takes another port rather than failing."""
    import errno
    import socket

    real_start = WebTransportListener.start
    refused: list[int] = []

    async def busy_once(self: WebTransportListener, port: int, cert: Any) -> Any:
        if not refused:
            refused.append(port)
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return await real_start(self, port, cert)

    monkeypatch.setattr(WebTransportListener, "start", busy_once)
    node = await node_factory(WEBTRANSPORT="true")
    assert refused and node.port != refused[0]
    assert {p for _, p in node.app.addresses} == {node.port}  # TCP and UDP on one port
    assert len(node.app.listeners) >= 2
    with socket.socket() as s:  # the first try's TCP listener is closed
        assert s.connect_ex(("127.0.0.1", refused[0])) != 0
    ws = await joined(node, "room", "alice")
    await ws.close()
