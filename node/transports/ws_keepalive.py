"""WebSocket keepalive: one timer pings every peer, finds the silent and closes the gone.

Split from node/transports/websocket.py; the rules for what silent means are in
node/presence.py (silence/heard) and node/silence.py (the node's side).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import math
import os
from typing import TYPE_CHECKING, Any, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from node.ports import Peers
from node.protocol import Fault
from node.silence import LoopLag, after_reads, loop_lag

if TYPE_CHECKING:
    from node.presence import Peer

OPEN = State.OPEN


class WebSocketLink(Protocol):
    """What the keepalive reads and sets on a peer's link (node/transports/websocket.py's
    ``WebSocketLink``; named here so that module can import this one)."""

    ws: ServerConnection
    peer: Peer | None
    closing: bool
    gone: bool
    silent: bool
    pinged_at: float
    ping_sent: float | None
    pong: asyncio.Future[float] | None
    keepalive_entry: list[Any] | None


class Keepalive:
    """One timer for all peers: a ping every ``interval``. No pong within ``silent_after``
    makes the peer *silent* (offline for the others after PRESENCE_GRACE, still connected,
    node/silence.py); none within ``timeout`` closes it 1011; a late pong brings a silent
    peer back. Neither deadline counts time the node's own loop was stalled, and none is
    decided before the loop has read its sockets once more (a pong may be waiting there).

    The ping carries 8 random bytes: a client that never reads cannot answer a payload it
    can guess (a millisecond timestamp could be) and stay connected. (A task per connection
    cost memory, and awaiting ``ws.ping()`` hung on a peer whose write buffer never
    drained.)"""

    def __init__(self, peers: Peers, interval: float, timeout: float,
                 silent_after: float = 0.0) -> None:
        self.peers = peers
        self.interval = interval
        self.timeout = timeout
        #: 0: no soft phase (also when it is not shorter than ``timeout``).
        self.silent_after = silent_after if 0 < silent_after < timeout else 0.0
        #: [when, seq, link]; link is None once forgotten (a closed connection is not
        #: kept alive until its next due time) or moved.
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._lag: LoopLag | None = None

    def add(self, link: WebSocketLink) -> None:
        if self.interval:
            if self._lag is None:
                self._lag = loop_lag()
            link.pinged_at = asyncio.get_running_loop().time()
            self._push(link.pinged_at + self.interval, link)

    def forget(self, link: WebSocketLink) -> None:
        entry, link.keepalive_entry = link.keepalive_entry, None
        if entry is not None:
            entry[2] = None
        pong, link.pong = link.pong, None
        if pong is not None:  # no "exception never retrieved" for a closed connection's
            if not pong.done():
                pong.cancel()
            elif not pong.cancelled():
                pong.exception()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        self._heap.clear()

    def _push(self, when: float, link: WebSocketLink) -> None:
        old = link.keepalive_entry
        if old is not None:
            old[2] = None
        entry = link.keepalive_entry = [when, next(self._seq), link]
        heapq.heappush(self._heap, entry)
        if when < self._timer_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = asyncio.get_running_loop().call_at(when, self._tick)

    def _deadline(self, link: WebSocketLink, sent: float) -> float:
        """When the awaited pong is overdue: silent first (if there is a soft phase)."""
        if self.silent_after and not link.silent:
            return sent + self.silent_after
        return sent + self.timeout

    def _tick(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = asyncio.get_running_loop().time()
        heap = self._heap
        later: list[tuple[float, WebSocketLink]] = []
        overdue: list[WebSocketLink] = []
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            link = entry[2]
            if link is None or link.gone or link.closing:
                continue
            link.keepalive_entry = None
            sent = link.ping_sent
            pong = link.pong
            if pong is not None and pong.done():
                self._answered(link, pong)
                sent = None
            if sent is not None:  # a pong is awaited
                due = self._deadline(link, sent)
                if now >= due:
                    overdue.append(link)  # decided after the next read (_confirm)
                else:
                    later.append((due, link))
            elif now - link.pinged_at >= self.interval:
                self._ping(link, now)
                later.append((min(now + self.interval, self._deadline(link, now)), link))
            else:
                later.append((link.pinged_at + self.interval, link))
        for when, link in later:
            entry = link.keepalive_entry = [when, next(self._seq), link]
            heapq.heappush(heap, entry)
        if heap:
            self._arm(heap[0][0])
        if overdue:
            after_reads(self._confirm, overdue)

    def _confirm(self, overdue: list[WebSocketLink]) -> None:
        """Deadlines passed at the last tick, seen again after the loop read its sockets,
        with the time the loop stalled since each ping added."""
        now = asyncio.get_running_loop().time()
        assert self._lag is not None  # set by add()
        for link in overdue:
            if link.gone or link.closing or link.keepalive_entry is not None:
                continue
            pong, sent = link.pong, link.ping_sent
            if pong is not None and pong.done():
                self._answered(link, pong)
                sent = None
            if sent is None:
                self._push(max(now, link.pinged_at + self.interval), link)
                continue
            due = self._deadline(link, sent) + self._lag.since(sent)
            if now < due:
                self._push(due, link)
            elif self.silent_after and not link.silent:
                link.silent = True
                if pong is not None:  # back the moment its pong is read
                    pong.add_done_callback(functools.partial(self._late, link))
                self._push(self._deadline(link, sent), link)
                if link.peer is not None:
                    self.peers.silent(link.peer)
            else:
                self._timed_out(link)

    def _late(self, link: WebSocketLink, pong: asyncio.Future[float]) -> None:
        if link.pong is pong and not link.gone and not link.closing:
            self._answered(link, pong)
            self._push(max(asyncio.get_running_loop().time(),
                           link.pinged_at + self.interval), link)

    def _ping(self, link: WebSocketLink, now: float) -> None:
        ws = link.ws
        if ws.protocol.state is not OPEN:
            return
        link.pinged_at = link.ping_sent = now
        stamp = os.urandom(8)
        # What ws.ping() does, without its task and send context (a ping is a few bytes:
        # no drain to wait for): ~85 us a ping that way, a tenth of a fan-out's node CPU
        # at 1,000 peers and PING_INTERVAL=1 (py-spy). The library resolves the future
        # when the pong comes (acknowledge_pings); the next tick reads it.
        pong: asyncio.Future[float] = ws.loop.create_future()
        ws.pending_pings[stamp] = (pong, now)
        link.pong = pong
        ws.protocol.send_ping(stamp)
        ws.send_data()

    def _answered(self, link: WebSocketLink, pong: asyncio.Future[float]) -> None:
        link.pong = link.ping_sent = None
        if link.silent:
            link.silent = False
            if link.peer is not None:
                self.peers.heard(link.peer)
        if pong.cancelled() or pong.exception() is not None:
            return
        latency = pong.result()
        if link.peer is not None:
            link.peer.rtt_ms = round(latency * 1000, 3)
            self.peers.ping_rtt(link.peer, latency)

    def _timed_out(self, link: WebSocketLink) -> None:
        if link.peer is not None:
            self.peers.fault(link.peer, Fault.PING_TIMEOUT,
                             f"ping timeout: no pong within {self.timeout:g}s")
