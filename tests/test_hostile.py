"""Issue 15 on a real node: hostile frames and peers, over WebSocket and WebTransport. Each
attack gets its documented answer (a close code and reason, or a drop), is counted, and
another peer keeps being served. HTTP, handshakes and the node's own limits are in
tests/test_hostile_http.py; the pure rules in tests/test_hostile_unit.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgpack
import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import NodeFactory
from tests.helpers import barrier, control, data_frame, join_frame, joined, pack, recv, still_served
from tests.mesh_helpers import wait_until
from tests.test_limits import close_of
from tests.wt_client import wt_connect


def state_frame(channel: str, pl: bytes) -> bytes:
    return pack({"t": "control", "op": "peer_state", "c": channel, "pl": pl})


# -- (2) re-joins cannot multiply the rate ------------------------------------------------


async def test_rejoining_to_buy_credit_is_charged_per_channel(node_factory: NodeFactory) -> None:
    """The issue's attack: re-join one of N channels, then answer the ack on every channel.
    A listener in all of them got 124x the rate; now each re-join pays for the N
    announcements it asks for, the listener gets a few times the rate, the sender is
    counted and closed 1008."""
    node = await node_factory(RATE_LIMIT="50", RATE_BURST="100", MAX_CHANNELS_PER_PEER="16")
    channels = [f"c{i}" for i in range(16)]
    attacker = await joined(node, channels[0], "attacker")
    listener = await joined(node, channels[0], "listener")
    for c in channels[1:]:
        for ws, who in ((attacker, "attacker"), (listener, "listener")):
            await ws.send(join_frame(c, who))
    counts = {"listener": 0}

    async def listen() -> None:
        while True:
            await recv(listener, 30)
            counts["listener"] += 1

    await asyncio.sleep(2.5)  # the joins' debt (16 * 17 / 2 tokens each) is paid back
    reader = asyncio.create_task(listen())
    await asyncio.sleep(0.2)
    counts["listener"] = 0
    started = time.monotonic()
    rounds = 0
    flooded = node.node.presence.dropped
    try:
        # (Until the node closes it: a peer closed for a flood is no longer read, and is
        # cut off 2 s later, unread frames and all.)
        while time.monotonic() - started < 3.0 and not flooded["rate_flood"]:
            await attacker.send(join_frame(channels[0], "attacker"))
            for c in channels:
                await attacker.send(control("peer_online", c))
                await attacker.send(state_frame(c, pack({"id": "attacker", "n": rounds})))
            rounds += 1
            await asyncio.sleep(0.001)
    except ConnectionClosed:
        pass
    elapsed = time.monotonic() - started
    code, reason = await close_of(attacker)
    reader.cancel()
    assert (code, reason) == (1008, "message rate over 50/s")
    dropped = node.node.presence.dropped
    assert dropped["rate_limited"] > 0 and dropped["rate_flood"] == 1
    # Within the rate, the burst, and what a re-join pays for: nowhere near 124x.
    assert counts["listener"] <= 3 * 50 * elapsed + 3 * 100 + 4 * 16, (counts, elapsed, rounds)
    await still_served(node)


async def test_a_peer_closed_for_a_flood_is_not_read_any_more(node_factory: NodeFactory) -> None:
    """After the 1008 the node reads nothing more from the flooder until its abort
    (websockets resumed reading as the handler took its queued messages: a re-join flood
    kept the node busy for those 2 s, 1.6 s of CPU)."""
    node = await node_factory(RATE_LIMIT="10", RATE_BURST="10")
    flooder = await joined(node, "room", "flooder")
    (sid,) = [p.sid for p in node.node.presence.peers.values() if p.client_id == "flooder"]
    server_side = node.node.links[sid].ws  # type: ignore[attr-defined]
    frame = data_frame("room", "x", '"y"')
    while not node.node.presence.dropped["rate_flood"]:
        flooder.transport.write(_client_frame(0x2, frame) * 50)
        await asyncio.sleep(0.002)
    flooder.transport.pause_reading()
    for _ in range(100):  # more frames after the close, as a flooder would
        flooder.transport.write(_client_frame(0x2, frame) * 50)
        assert not server_side.transport.is_reading()
        await asyncio.sleep(0.01)
    await wait_until(lambda: server_side.transport.is_closing(), 5, "the abort")
    flooder.transport.abort()
    await still_served(node)


# -- (3) decode after the rate check, bounded -----------------------------------------------


async def test_a_payload_of_many_objects_closes_1007_before_it_is_built(
        node_factory: NodeFactory) -> None:
    node = await node_factory()
    sender = await joined(node, "room", "sender")
    other = await joined(node, "room", "other")
    await sender.send(state_frame("room", pack([None] * 60_000)))
    assert await close_of(sender) == (1007, "pl: a msgpack array longer than 1024")
    nested = pack({"a": [[None] * 1000 for _ in range(60)]})
    s2 = await joined(node, "room", "s2")
    await s2.send(state_frame("room", nested))
    code, reason = await close_of(s2)
    assert code == 1007 and "more than 1024 msgpack objects" in reason
    assert node.node.presence.dropped["invalid"] == 2
    assert other.protocol.close_rcvd is None  # the bystander is still there
    await still_served(node)


async def test_frames_for_channels_not_joined_are_dropped_before_their_payload_is_read(
        node_factory: NodeFactory) -> None:
    """A frame for a channel the peer is not in is counted and dropped on its head: its
    payload (here not even msgpack) is never decoded, so it costs no 1007 either."""
    node = await node_factory()
    sender = await joined(node, "room", "sender")
    other = await joined(node, "room", "other")
    for _ in range(20):
        await sender.send(state_frame("elsewhere", b"\xc1" * 60_000))
        await sender.send(pack({"t": "data", "c": "elsewhere", "pl": b"\xc1" * 1000}))
    await barrier(sender, other, "room")  # still open, and in order
    assert node.node.presence.dropped["not_joined"] == 40
    assert node.node.presence.dropped["invalid"] == 0


async def test_frames_over_the_rate_are_dropped_before_their_payload_is_read(
        node_factory: NodeFactory) -> None:
    node = await node_factory(RATE_LIMIT="0.2", RATE_BURST="5")  # (a token per 5 s)
    sender = await joined(node, "room", "sender")
    other = await joined(node, "room", "other")
    for _ in range(4):  # the burst, less the join's token: these are read (valid)
        await sender.send(data_frame("room", "e", "1"))
    for _ in range(5):  # over the rate: dropped on the head, the bad payload never read
        await sender.send(pack({"t": "data", "c": "room", "pl": b"\xc1"}))
    await wait_until(lambda: node.node.presence.dropped["rate_limited"] >= 5, 5, "drops")
    assert node.node.presence.dropped["invalid"] == 0
    assert node.node.presence.dropped["rate_flood"] == 0
    for _ in range(4):
        assert (await recv(other))["t"] == "data"


async def test_the_same_bounds_over_webtransport_streams(node_factory: NodeFactory) -> None:
    node = await node_factory()
    reader = await joined(node, "room", "reader")
    async with wt_connect(node.port, "/v1?publickey=k&id=wt") as wt:
        wt.send_stream(join_frame("room", "wt"))
        await wt.next_message(match=lambda m: m.get("op") == "channel_join")
        wt.send_stream(state_frame("elsewhere", b"\xc1" * 30_000))  # not joined: dropped
        wt.send_stream(state_frame("room", pack([None] * 60_000)))
        await wt.until(lambda: wt.close_capsule is not None, 5, "the close capsule")
        assert wt.close_capsule == (1007, "pl: a msgpack array longer than 1024")
    assert node.node.presence.dropped["not_joined"] == 1
    await still_served(node)
    await reader.close()


# -- (11) names: ids and channels ------------------------------------------------------------


async def test_a_channel_name_with_control_or_bidi_characters_closes_1007(
        node_factory: NodeFactory) -> None:
    node = await node_factory()
    for name, why in [("a\x00b", "control characters (U+0000)"),
                      ("room\n", "control characters (U+000A)"),
                      ("\u202eevil", "format characters (U+202E)"),
                      ("zero\u200bwidth", "format characters (U+200B)")]:
        ws = await joined(node, "fine", "x")
        await ws.send(join_frame(name, "x"))
        code, reason = await close_of(ws)
        assert code == 1007 and reason == f"channel name contains {why}", reason
    ok = await joined(node, "名前 with space · ✓", "y")  # every visible script is fine
    await ok.close()
    await still_served(node)


def _msgpack_str(raw: bytes) -> bytes:
    return bytes((0xA0 | len(raw),)) + raw


async def test_a_channel_name_that_is_not_utf8_closes_1007(node_factory: NodeFactory) -> None:
    node = await node_factory()
    ws = await joined(node, "fine", "x")
    frame = (b"\x83" + _msgpack_str(b"t") + _msgpack_str(b"control") + _msgpack_str(b"op")
             + _msgpack_str(b"channel_join") + _msgpack_str(b"c") + _msgpack_str(b"r\xff"))
    await ws.send(frame)
    assert await close_of(ws) == (1007, "c (channel) is not valid UTF-8")


async def test_received_frames_are_what_was_decoded(node_factory: NodeFactory) -> None:
    """(The head and payload checks keep forwarding exactly what the client sent.)"""
    node = await node_factory()
    a = await joined(node, "room", "a")
    b = await joined(node, "room", "b")
    await a.send(data_frame("room", "e", '{"x": 1}'))
    got: dict[str, Any] = await recv(b)
    assert msgpack.unpackb(got["pl"]) == {"event": "e", "data": '{"x": 1}'}


async def test_an_id_that_hides_or_reorders_is_refused_400_on_both_transports(
        node_factory: NodeFactory) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    from tests.helpers import insecure

    node = await node_factory()
    for raw, why in [("%E2%80%AEnimda", "id contains format characters (U+202E)"),
                     ("al%FFice", "id is not valid UTF-8")]:
        url = f"{node.ws_base}/v1?publickey=k&id={raw}"
        try:
            await connect(url, ssl=insecure())
            raise AssertionError("admitted")
        except InvalidStatus as exc:
            assert exc.response.status_code == 400
            assert exc.response.body == f"bad id: {why}\n".encode()
        async with wt_connect(node.port, f"/v1?publickey=k&id={raw}") as wt:
            assert wt.status == 400
    await still_served(node)


# -- (4) control replies count toward the write backlog; (5) pings cannot be guessed ------


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A final, masked client frame (mask 0: the payload goes as is) of at most 125 bytes."""
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


async def test_pings_sent_without_reading_close_the_peer_as_a_slow_reader(
        node_factory: NodeFactory) -> None:
    """400,000 pings without reading made the node queue 55 MB of pongs until the ping
    timeout. More than 50 pings or pongs a second now close 1008 (rate_flood), and pongs
    count toward WRITE_BUFFER_LIMIT (slow_reader) whichever comes first."""
    node = await node_factory(WRITE_BUFFER_LIMIT=str(256 * 1024))
    a = await joined(node, "calm", "a")
    b = await joined(node, "calm", "b")
    pinger = await joined(node, "room", "pinger")
    pinger.transport.pause_reading()
    blob = _client_frame(0x9, b"p" * 125) * 1000
    started = time.monotonic()
    dropped = node.node.presence.dropped
    for _ in range(200):  # up to 26 MB of pings, 25 MB of pongs owed
        if dropped["slow_reader"] or dropped["rate_flood"] or pinger.transport.is_closing():
            break
        pinger.transport.write(blob)
        await asyncio.sleep(0.005)
    await wait_until(lambda: dropped["slow_reader"] + dropped["rate_flood"] == 1, 5,
                     "the pinger closed")
    assert time.monotonic() - started < 3.0  # (2 s is the goal; slack for a loaded machine)
    await wait_until(lambda: all(p.client_id != "pinger"
                                 for p in node.node.presence.peers.values()), 5, "gone")
    pinger.transport.abort()
    await barrier(a, b, "calm")


async def test_blind_answers_to_pings_do_not_keep_a_non_reader_connected(
        node_factory: NodeFactory) -> None:
    """Pings carried a millisecond timestamp: a client that never reads could send pongs for
    every recent millisecond and pass for alive. Random payloads cannot be guessed."""
    import struct

    node = await node_factory(PING_INTERVAL="0.3", PING_TIMEOUT="0.6")
    a = await joined(node, "calm", "a")
    b = await joined(node, "calm", "b")
    liar = await joined(node, "room", "liar", ping_interval=None)
    liar.transport.pause_reading()  # (the library would answer the real pings)
    dropped = node.node.presence.dropped
    started = time.monotonic()
    while not dropped["ping_timeout"] and time.monotonic() - started < 5:
        # Guesses around now, under the 50 pings-or-pongs-a-second cap.
        now_ms = int(time.time() * 1000)
        liar.transport.write(b"".join(_client_frame(0xA, struct.pack(">Q", ms))
                                      for ms in range(now_ms - 5, now_ms + 5)))
        await asyncio.sleep(0.25)
    assert dropped["ping_timeout"] == 1 and dropped["rate_flood"] == 0
    assert time.monotonic() - started < 3.5
    liar.transport.abort()
    await barrier(a, b, "calm")


# -- (1) HTTP/3 frames declared too big; (7) QUIC connections without a session -------------


async def test_a_trickled_huge_headers_frame_is_refused_on_its_header(
        node_factory: NodeFactory) -> None:
    """A HEADERS frame declaring 4 MiB, then zeros a packet at a time: aioquic would buffer
    it and re-copy it on every packet (cost growing with the square of its size). The
    connection is closed as soon as the frame header is in, counted; others are served."""
    node = await node_factory()
    a = await joined(node, "room", "a")
    b = await joined(node, "room", "b")
    async with wt_connect(node.port) as attacker:
        declared = 4 * 1024 * 1024
        await _trickle(attacker, attacker._quic.get_next_available_stream_id(),
                       b"\x01" + (0x80000000 | declared).to_bytes(4, "big"))
        assert attacker.terminated.error_code == 0x107  # H3_EXCESSIVE_LOAD
        assert "declares 4194304 bytes" in attacker.terminated.reason_phrase
    assert node.node.presence.dropped["headers_too_large"] == 1
    await barrier(a, b, "room")
    async with wt_connect(node.port, "/v1?publickey=k&id=ok") as fine:  # real requests pass
        assert fine.status == 200


async def _trickle(attacker: Any, stream_id: int, first: bytes) -> None:
    """``first`` (a header declaring a huge length), then zeros a packet at a time until the
    server closes the connection, which must be within 3 s."""
    quic = attacker._quic
    quic.send_stream_data(stream_id, first)
    attacker.transmit()
    started = time.monotonic()
    for _ in range(200):
        if attacker.terminated is not None:
            break
        quic.send_stream_data(stream_id, bytes(1000))
        attacker.transmit()
        await asyncio.sleep(0.005)
    await attacker.until(lambda: attacker.terminated is not None, 5, "the server's close")
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize(("stream", "first", "code", "why"), [
    # MAX_PUSH_ID (which a client may send) declaring 4 MiB on its own control stream.
    ("control", b"\x0d\x80\x40\x00\x00", 0x107, "control frame of type 0xd declares"),
    # An insert with a literal name declaring 4 MiB on its QPACK encoder stream.
    ("encoder", b"\x5f\xe1\xff\xff\x01", 0x201, "QPACK encoder stream: a string declares"),
])
async def test_huge_frames_on_the_control_and_qpack_streams_are_refused_on_their_header(
        node_factory: NodeFactory, stream: str, first: bytes, code: int, why: str) -> None:
    """aioquic buffers a control-stream SETTINGS or MAX_PUSH_ID frame until complete
    (re-copied on every packet), and hands the encoder stream to the QPACK library: the
    declared length is read first, the connection closed with the H3 error, counted."""
    node = await node_factory()
    a = await joined(node, "room", "a")
    b = await joined(node, "room", "b")
    async with wt_connect(node.port) as attacker:
        await _trickle(attacker, attacker.h3._local_control_stream_id if stream == "control"
                       else attacker.h3._local_encoder_stream_id, first)
        assert attacker.terminated.error_code == code
        assert why in attacker.terminated.reason_phrase, attacker.terminated.reason_phrase
    assert node.node.presence.dropped["h3_stream_too_large"] == 1
    await barrier(a, b, "room")
    async with wt_connect(node.port, "/v1?publickey=k&id=ok") as fine:  # real clients pass
        assert fine.status == 200


async def test_quic_connections_without_a_session_count_and_a_get_a_second_is_closed(
        node_factory: NodeFactory) -> None:
    node = await node_factory(HANDSHAKE_TIMEOUT="0.5")
    async with wt_connect(node.port) as idle:
        assert node.node.handshakes["webtransport"] == 1
        started = time.monotonic()
        while idle.terminated is None and time.monotonic() - started < 6:
            idle.connect_session("/health", method=b"GET")  # keeps it busy: not for ever
            await asyncio.sleep(0.2)
        assert idle.terminated is not None and time.monotonic() - started < 4.5
    await wait_until(lambda: node.node.handshakes["webtransport"] == 0, 5, "uncounted")
    async with wt_connect(node.port, "/v1?publickey=k&id=w") as wt:  # a session: not counted
        assert wt.status == 200
        assert node.node.handshakes["webtransport"] == 0


async def test_half_open_quic_connections_share_the_bound_the_oldest_closed(
        node_factory: NodeFactory) -> None:
    """QUIC connections without a session are half-open like TCP ones: past
    MAX_HANDSHAKES the oldest is closed (any transport's), counted; a session still opens."""
    from testkit.wt_client import close_client, open_client

    node = await node_factory(MAX_HANDSHAKES="2", HANDSHAKE_TIMEOUT="30")
    first = await open_client(node.port, None)
    second = await open_client(node.port, None)
    try:
        await wait_until(lambda: node.node.handshakes["webtransport"] == 2, 5, "counted")
        async with wt_connect(node.port, "/v1?publickey=k&id=w") as wt:  # a third: room made
            assert wt.status == 200
            await first.until(lambda: first.terminated is not None, 5, "the oldest closed")
            assert first.terminated.reason_phrase == "too many connections in their handshake"
            assert second.terminated is None
            assert node.node.presence.dropped["handshake_limit"] == 1
            assert node.node.handshakes["webtransport"] == 1
    finally:
        await close_client(first)
        await close_client(second)
    await wait_until(lambda: node.node.handshakes["webtransport"] == 0, 5, "released")


async def test_a_tcp_newcomer_closes_the_oldest_half_open_quic_connection(
        node_factory: NodeFactory) -> None:
    """MAX_CONNECTIONS is one bound for both transports: a node full of QUIC connections
    without a session makes room for a WebSocket peer by closing the oldest of them."""
    from testkit.wt_client import close_client, open_client

    node = await node_factory(MAX_CONNECTIONS="20", HANDSHAKE_TIMEOUT="30")
    idle = [await open_client(node.port, None) for _ in range(20)]
    try:
        await wait_until(lambda: node.node.handshakes["webtransport"] == 20, 5, "counted")
        assert node.node.connections() == 20
        peer = await joined(node, "room", "p")  # over the bound by one: the oldest goes
        await idle[0].until(lambda: idle[0].terminated is not None, 5, "the oldest closed")
        assert idle[0].terminated.reason_phrase == "too many connections in their handshake"
        assert all(c.terminated is None for c in idle[1:])
        assert node.node.presence.dropped["handshake_limit"] == 1
        assert node.node.connections() <= 20
        await peer.close()
    finally:
        for client in idle:
            await close_client(client)
    await wait_until(lambda: node.node.handshakes["webtransport"] == 0, 5, "released")


async def test_a_publickey_that_is_not_utf8_is_refused_400(node_factory: NodeFactory) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    from tests.helpers import insecure

    node = await node_factory()
    try:
        await connect(f"{node.ws_base}/v1?publickey=k%FF&id=a", ssl=insecure())
        raise AssertionError("admitted")
    except InvalidStatus as exc:
        assert exc.response.status_code == 400
        assert exc.response.body == b"publickey is not valid UTF-8\n"
    await still_served(node)
