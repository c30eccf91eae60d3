"""The WebSocket keepalive (node/transports/websocket.py) on its own: one timer for all
peers, a random ping every interval, a missing pong reported silent (soft timeout) and then
as a ping-timeout fault (hard timeout), a late pong taken back, the node's own stalls not
counted against its peers."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from websockets.protocol import State

from node.presence import Peer
from node.protocol import Fault
from node.transports.websocket import WebSocketLink
from node.transports.ws_keepalive import Keepalive
from tests.mesh_helpers import wait_until

pytestmark = pytest.mark.unit


class FakeWS:
    """What the keepalive touches of a ServerConnection: its loop, protocol (state,
    send_ping), pending_pings and send_data. An answering one resolves the pong as the
    library's acknowledge_pings does when the client's pong arrives."""

    def __init__(self, answers: bool) -> None:
        self.protocol = SimpleNamespace(state=State.OPEN, send_ping=self._send_ping)
        self.loop = asyncio.get_running_loop()
        self.answers = answers
        self.pings: list[bytes] = []
        self.pending_pings: dict[bytes, tuple[asyncio.Future[float], float]] = {}

    def _send_ping(self, data: bytes) -> None:
        self.pings.append(data)

    def send_data(self) -> None:
        if self.answers:
            for pong, _ in self.pending_pings.values():
                pong.set_result(0.0025)
            self.pending_pings.clear()


class FakePeers:
    def __init__(self) -> None:
        self.faults: list[tuple[str, Fault, str]] = []
        self.rtts: list[float] = []
        #: ("silent" | "heard", client id), in order.
        self.reports: list[tuple[str, str]] = []

    def silent(self, peer: Peer) -> None:
        self.reports.append(("silent", peer.client_id))

    def heard(self, peer: Peer) -> None:
        self.reports.append(("heard", peer.client_id))

    def ping_rtt(self, peer: Peer, seconds: float) -> None:
        self.rtts.append(seconds)

    def fault(self, peer: Peer, fault: Fault, reason: str) -> None:
        self.faults.append((peer.client_id, fault, reason))


def link(name: str, answers: bool) -> tuple[WebSocketLink, FakeWS]:
    ws = FakeWS(answers)
    out = WebSocketLink(ws, None)  # type: ignore[arg-type]  # the writer is not used here
    out.peer = Peer(sid=name, client_id=name, app="a", transport="websocket")
    return out, ws


async def test_live_peers_are_pinged_every_interval_and_get_their_rtt() -> None:
    peers: Any = FakePeers()
    keepalive = Keepalive(peers, interval=0.05, timeout=0.5)
    live, ws = link("live", answers=True)
    keepalive.add(live)
    try:
        await wait_until(lambda: len(ws.pings) >= 3, 5, "three pings")
    finally:
        keepalive.stop()
    assert peers.faults == []
    assert live.peer is not None and live.peer.rtt_ms == 2.5
    assert peers.rtts and set(peers.rtts) == {0.0025}  # the node's RTT histogram
    # The payload is 8 random bytes (the client echoes it), none like another.
    assert {len(p) for p in ws.pings} == {8} and len(set(ws.pings)) == len(ws.pings)


@pytest.mark.parametrize("silent_after", [0.0, 0.1])
async def test_a_silent_peer_is_reported_once_after_the_timeout(silent_after: float) -> None:
    """Closed once at the (hard) timeout; with a soft one, reported silent once before."""
    peers: Any = FakePeers()
    keepalive = Keepalive(peers, interval=0.05, timeout=0.2, silent_after=silent_after)
    silent, ws = link("silent", answers=False)
    live, live_ws = link("live", answers=True)
    keepalive.add(silent)
    keepalive.add(live)
    start = asyncio.get_running_loop().time()
    try:
        await wait_until(lambda: peers.faults, 5, "a ping timeout")
        elapsed = asyncio.get_running_loop().time() - start
        # The node closes it; until then the keepalive must not report it again.
        silent.closing = True
        # Six more pings of the other link: longer than a timeout, a second report would show.
        seen = len(live_ws.pings)
        await wait_until(lambda: len(live_ws.pings) >= seen + 6, 5, "six more pings")
    finally:
        keepalive.stop()
    assert peers.faults == [("silent", Fault.PING_TIMEOUT, "ping timeout: no pong within 0.2s")]
    assert peers.reports == ([("silent", "silent")] if silent_after else [])
    assert 0.2 <= elapsed < 2.0
    assert len(ws.pings) == 1  # no new ping while a pong is awaited


async def test_a_forgotten_link_is_never_pinged_and_interval_zero_is_off() -> None:
    peers: Any = FakePeers()
    keepalive = Keepalive(peers, interval=0.05, timeout=0.2)
    gone, gone_ws = link("gone", answers=False)
    watch, watch_ws = link("watch", answers=True)
    keepalive.add(gone)
    keepalive.add(watch)
    keepalive.forget(gone)
    try:
        await wait_until(lambda: len(watch_ws.pings) >= 3, 5, "pings to the other link")
    finally:
        keepalive.stop()
    assert gone_ws.pings == [] and peers.faults == []

    off = Keepalive(peers, interval=0, timeout=0.2)
    quiet, _ = link("quiet", answers=False)
    off.add(quiet)
    assert quiet.keepalive_entry is None and off._timer is None


async def test_past_the_soft_timeout_silent_not_closed_and_a_late_pong_brings_it_back() -> None:
    peers: Any = FakePeers()
    keepalive = Keepalive(peers, interval=0.05, timeout=5.0, silent_after=0.2)
    late, ws = link("late", answers=False)
    keepalive.add(late)
    try:
        await wait_until(lambda: peers.reports, 5, "silent")
        assert peers.reports == [("silent", "late")] and peers.faults == []
        assert len(ws.pings) == 1  # the same ping stays awaited
        (pong, _), = ws.pending_pings.values()
        pong.set_result(0.4)  # its pong, read at last
        await wait_until(lambda: len(peers.reports) == 2, 5, "heard")
        assert peers.reports[1] == ("heard", "late") and peers.rtts == [0.4]
        await wait_until(lambda: len(ws.pings) >= 2, 5, "pinged again")  # the usual cycle
    finally:
        keepalive.stop()
    assert peers.faults == []


async def test_loop_lag_counts_the_stalls_after_a_moment_only() -> None:
    from node.silence import LoopLag

    loop = asyncio.get_running_loop()
    lag = LoopLag(loop, period=0.02, threshold=0.05)
    try:
        await asyncio.sleep(0.1)  # a quiet loop: timers on time
        before = loop.time()
        assert lag.since(before - 1) < 0.05
        time.sleep(0.3)  # a stall, asked about before the timer noticed it
        assert lag.since(before) >= 0.25
        after = loop.time()
        await asyncio.sleep(0.1)
        assert lag.since(after) < 0.05 and lag.since(before) >= 0.25
    finally:
        lag.stop()
