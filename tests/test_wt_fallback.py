"""A WebTransport datagram peer and a message too big for a datagram, on the real listener.

Such a message goes on a server-opened unidirectional stream, which @yomo/presence in
Chromium never reads (docs/client.md): it must be counted, logged once per peer, and the
size at which it starts measured (docs/webtransport.md quotes these numbers).
"""

from __future__ import annotations

import json
import logging

import msgpack
import pytest

from node.transports.webtransport import WebTransportListener
from node.transports.wt_session import ACK_ROOM, TOO_BIG_FOR_DATAGRAM, WebTransportSession
from tests.conftest import NodeFactory, RunningNode
from tests.helpers import control, data_frame, get, join_frame, joined
from tests.wt_client import WTClient, wt_connect

#: With aioquic's default 1200-byte packets and 8-byte connection ids (docs/webtransport.md).
ROOM = 1169
LARGEST_DATAGRAM = ROOM - ACK_ROOM  # 1137


def only_session(node: RunningNode) -> WebTransportSession:
    listener = next(t for t in node.app.listeners if isinstance(t, WebTransportListener))
    conn = next(iter(listener.connections))
    return next(iter(conn.sessions.values()))


async def join(wt: WTClient, channel: str, client_id: str) -> None:
    wt.send_datagram(join_frame(channel, client_id))
    await wt.next_message(match=lambda m: m.get("op") == "channel_join")
    wt.send_datagram(control("peer_online", channel))


def size_of(message: dict[str, object]) -> int:
    """The bytes the node sent: msgpack re-encodes what it decoded byte for byte here
    (str stays str, bin stays bin, map order and the shortest int forms are kept)."""
    return len(msgpack.packb(message, use_bin_type=True))


async def test_1137_bytes_go_as_a_datagram_1138_on_a_counted_stream(
        node_factory: NodeFactory, caplog: pytest.LogCaptureFixture) -> None:
    node = await node_factory(WEBTRANSPORT="true")
    ws = await joined(node, "room", "sender")
    caplog.set_level(logging.WARNING, logger="prscd.wt")
    async with wt_connect(node.port, "/v1?publickey=key&id=dg") as wt:
        await join(wt, "room", "dg")
        session = only_session(node)
        assert session.io.datagram_room(session.session_id) == ROOM

        async def deliver(text_len: int) -> tuple[str, int]:
            await ws.send(data_frame("room", "e", json.dumps("x" * text_len)))
            via, got = await wt.next_via()
            while got.get("t") != "data":  # the sender's own online/state, if any
                via, got = await wt.next_via()
            return via, size_of(got)

        # A probe fixes the framing overhead; sizes then grow one byte per character
        # (every length header stays 2 bytes wide between 256 and 65535).
        via, probe = await deliver(1000)
        assert via == "datagram"
        text_len = 1000 + LARGEST_DATAGRAM - probe
        assert await deliver(text_len) == ("datagram", 1137)
        assert node.node.presence.dropped[TOO_BIG_FOR_DATAGRAM] == 0
        assert await deliver(text_len + 1) == ("stream", 1138)
        assert await deliver(text_len + 1000) == ("stream", 2137)
        assert await deliver(text_len) == ("datagram", 1137)  # datagrams still flow

    assert node.node.presence.dropped[TOO_BIG_FOR_DATAGRAM] == 2
    assert node.node.health()["dropped"][TOO_BIG_FOR_DATAGRAM] == 2
    status, _, body = await get(f"https://127.0.0.1:{node.port}/metrics")
    assert status == 200
    assert f'prscd_dropped_total{{reason="{TOO_BIG_FOR_DATAGRAM}"}} 2.0' in body.decode()
    # One line per peer, not per message; it names the size and the room, no key.
    lines = [r.getMessage() for r in caplog.records if "datagram room" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "message of 1138 bytes over the datagram room of 1137" in lines[0]
    assert "id=dg" in lines[0] and "publickey" not in lines[0]
    await ws.close()


async def test_each_datagram_peer_is_logged_once_a_stream_peer_never(
        node_factory: NodeFactory, caplog: pytest.LogCaptureFixture) -> None:
    node = await node_factory(WEBTRANSPORT="true")
    ws = await joined(node, "room", "sender")
    caplog.set_level(logging.WARNING, logger="prscd.wt")
    async with (wt_connect(node.port, "/v1?publickey=key&id=dg1") as a,
                wt_connect(node.port, "/v1?publickey=key&id=dg2") as b,
                wt_connect(node.port, "/v1?publickey=key&id=rel") as r):
        await join(a, "room", "dg1")
        await join(b, "room", "dg2")
        # A reliable peer (it writes on a stream) is answered on a stream anyway: no drop.
        r.send_stream(join_frame("room", "rel") + control("peer_online", "room"))
        await r.next_message(match=lambda m: m.get("op") == "channel_join")
        for _ in range(3):
            await ws.send(data_frame("room", "big", json.dumps("x" * 3000)))
        for wt in (a, b, r):
            for _ in range(3):
                got = await wt.next_message(match=lambda m: m.get("t") == "data")
                assert wt.messages[wt.read - 1][0] == "stream" and size_of(got) > 3000
    assert node.node.presence.dropped[TOO_BIG_FOR_DATAGRAM] == 6
    lines = [r.getMessage() for r in caplog.records if "datagram room" in r.getMessage()]
    assert sorted(line.split(" id=")[1].split(":")[0] for line in lines) == ["dg1", "dg2"]
    await ws.close()
