"""A silent peer: offline for the others soon, its connection closed only much later.

The keepalive has two timeouts (docs/presence.md). Past the soft one
(``PING_SILENT_TIMEOUT``: no pong; ``WT_SILENT_TIMEOUT``: no packet) the transport reports
the peer *silent*: it is held in its channels for ``PRESENCE_GRACE`` and then goes offline
for the others, but its connection stays open. Past the hard one (``PING_TIMEOUT``,
``WT_IDLE_TIMEOUT``) the connection is closed. A silent peer heard again (a late pong, any
frame or packet) comes back: within the grace period nobody saw anything; after it, it
re-joins its channels with its last state (node/presence.py ``Presence.heard``).

Neither timeout counts the node's own lateness (:class:`LoopLag`): when the event loop
was busy, a pong may be sitting unread in a socket buffer, and the peer is not to blame.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from node.grace import Grace
    from node.presence import Action, Peer, Presence

log = logging.getLogger("prscd.silence")


class LoopLag:
    """How late this event loop ran lately: a timer every ``period`` notes how late it
    fired, and each stall (later than ``threshold``) is kept for about ``keep`` seconds.
    :meth:`since` says how much of the time since a moment the loop was not running our
    callbacks; a keepalive deadline is extended by that much. O(log n) per question (a
    starved node may ask it for thousands of peers at once)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, period: float = 0.1,
                 threshold: float = 0.05, keep: float = 120.0) -> None:
        self.loop = loop
        self.period = period
        self.threshold = threshold
        self.keep = keep
        #: When each stall was noticed, and the seconds of all stalls up to it (kept ones).
        self._at: list[float] = []
        self._sum: list[float] = []
        self.total = 0.0
        self._dropped = 0.0  # the sum up to the first kept stall
        self._due = loop.time() + period
        self._timer = loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        now = self.loop.time()
        late = now - self._due
        if late > self.threshold:
            self.total += late
            self._at.append(now)
            self._sum.append(self.total)
            old = bisect.bisect_left(self._at, now - self.keep)
            if old > 64:  # trimmed in batches
                self._dropped = self._sum[old - 1]
                del self._at[:old], self._sum[:old]
        self._due = now + self.period
        self._timer = self.loop.call_at(self._due, self._tick)

    def since(self, when: float) -> float:
        """Seconds the loop stalled after ``when`` (noticed by now)."""
        self.catch_up()
        i = bisect.bisect_right(self._at, when)
        return self.total - (self._sum[i - 1] if i else self._dropped)

    def catch_up(self) -> None:
        """Note a stall still under way when asked before the timer ran (another timer
        due at the same time may run first)."""
        if self.loop.time() - self._due > self.threshold:
            self._timer.cancel()
            self._tick()

    def stop(self) -> None:
        self._timer.cancel()


_lags: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopLag] = (
    weakref.WeakKeyDictionary())


def loop_lag() -> LoopLag:
    """The running loop's :class:`LoopLag` (one per loop: several nodes in one process,
    as in the tests, share it), started on first use."""
    loop = asyncio.get_running_loop()
    lag = _lags.get(loop)
    if lag is None:
        lag = _lags[loop] = LoopLag(loop)
    return lag


def after_reads(callback: object, *args: object) -> None:
    """Run ``callback(*args)`` after the loop has polled its sockets at least once more:
    uvloop runs due timers before it reads, so a pong read only now must still count.
    (Two ``call_soon`` hops: the second is queued after the next poll.)"""
    loop = asyncio.get_running_loop()
    loop.call_soon(loop.call_soon, callback, *args)


class _Node(Protocol):
    """What :class:`Silence` uses of node/server.py's Node (which owns it)."""

    presence: Presence
    links: Mapping[str, Any]
    draining: bool
    grace: Grace[tuple[str, str], Peer]
    grace_counts: dict[str, int]

    async def _execute(self, actions: list[Action]) -> int: ...


class Silence:
    """The node's side: a transport reports a peer silent or heard again; the rules decide
    who sees what (node/presence.py), and the node's grace timers do the rest."""

    def __init__(self, node: _Node) -> None:
        self.node = node

    async def silent(self, peer: Peer) -> None:
        node = self.node
        if peer.silent or peer.sid not in node.links or node.draining:
            return
        node.grace_counts["silent"] += 1
        log.info("peer silent sid=%s id=%s transport=%s: offline for the others after "
                 "%gs unless heard again; the connection stays open", peer.sid,
                 peer.client_id, peer.transport, node.grace.seconds)
        await node._execute(node.presence.silence(peer))

    async def heard(self, peer: Peer) -> None:
        node = self.node
        if not peer.silent or peer.sid not in node.links:
            return
        rejoined = bool(peer.released)
        node.grace_counts["rejoined" if rejoined else "heard"] += 1
        log.info("peer heard again sid=%s id=%s transport=%s: %s", peer.sid, peer.client_id,
                 peer.transport, "re-joins its channels" if rejoined else "within the grace "
                 "period, nobody saw it go")
        await node._execute(node.presence.heard(peer))

    def closed(self, peer: Peer) -> list[Action]:
        """A silent peer's connection ended, however (the hard timeout, a reset, a close by
        the node for its backlog): it is gone as it went silent, so the channels still
        held keep their grace timers (a release, or its id back in time, decides)."""
        peer.silent = False
        peer.released = None
        self.node.presence.hold(peer)  # out of the delivery lists; its Hold ran already
        return []
