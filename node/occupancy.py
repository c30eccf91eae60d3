"""``channel_occupied`` / ``channel_vacated``, mesh-wide, for the membership webhooks.

A node only sees its own side: the rules return ``Interest(app, channel, active)``
exactly when its channel goes from no local peer to some and back. Whether that is the
first member *anywhere* or the last one gone, the node asks the others over the mesh
query (``"occupancy"``: each node answers ``{"members": n, "since": t, "period": p}``,
``t`` its wall clock when its channel got its first local member, ``p`` below) and decides:

* local 0 -> 1: ``channel_occupied`` if no other node has members, or if this node's
  ``(since, node_id)`` is the earliest among the nodes that do. Every node that sees
  the same answers picks the same earliest node, so two regions gaining their first
  member at once send one event between them when they hear each other; and a node
  that joins a channel held elsewhere is never the earliest, so it stays quiet.
* local 1 -> 0: ``channel_vacated`` if no other node that answered has members.

Two nodes losing their last members at once can both send ``channel_vacated``. So a
channel event's id is made from the *period* of occupancy it ends or starts (the
``(since, node id)`` of its first holder, which each later holder takes over from the
answers): a repeated event carries the same id, and a receiver that drops repeated ids
(it must, for retries) gets it once. A node that does not answer counts as empty: that
can duplicate an event (never miss one), except that a node that dies holding the last
members makes no 1 -> 0 at all, so nobody sends ``channel_vacated``. docs/webhooks.md
says what this guarantees, and how a backend reconciles.

The local 1 -> 0 waits ``WEBHOOK_GRACE`` first (a page reload is not a vacancy), through
the same :class:`node.grace.Grace` as ``member_left``; meanwhile the node still answers
that it has a member.

Decisions for one channel are made one at a time, in order; at most ``CONCURRENT_ASKS``
channels ask at once, and at most ``limit`` decisions wait (more are dropped, counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from node.grace import Grace

if TYPE_CHECKING:
    from mesh.query import MeshQuery
    from node.presence import Presence

log = logging.getLogger("prscd.webhooks")

KIND = "occupancy"
#: (since, node id) of a channel's first holder: names one period of occupancy, mesh-wide.
Period = tuple[float, str]
_IDS = uuid.UUID("5b0c3a52-6d1e-4c55-9a43-2f1c9d4e7a10")  # namespace of channel event ids
CONCURRENT_ASKS = 16
#: At the node's stop, the channels' last decisions get this long.
STOP_DECIDE = 1.0


# -- the decisions (pure) --------------------------------------------------------------------


def holders(me: str, answers: dict[str, dict[str, Any]]) -> dict[str, float]:
    """node id -> since, for every other node that answered sanely that it has members."""
    out: dict[str, float] = {}
    for node, answer in answers.items():
        if node == me or not isinstance(answer, dict):
            continue
        members, since = answer.get("members"), answer.get("since")
        if (isinstance(members, int) and not isinstance(members, bool) and members > 0
                and isinstance(since, int | float) and math.isfinite(since)):
            out[node] = float(since)
    return out


def occupied(me: str, since: float, answers: dict[str, dict[str, Any]]) -> tuple[bool, Period]:
    """Does this node's local 0 -> 1 (at wall-clock ``since``) make it the first member?
    And the occupancy period it is part of: ``(since, node id)`` of the first holder, as
    that holder tells it (it may have taken it over from an earlier one)."""
    first = min([(since, me), *((t, node) for node, t in holders(me, answers).items())])
    if first[1] == me:
        return True, first
    return False, as_period(answers[first[1]].get("period")) or first


def as_period(value: Any) -> Period | None:
    if (isinstance(value, list | tuple) and len(value) == 2
            and isinstance(value[0], int | float) and math.isfinite(value[0])
            and isinstance(value[1], str)):
        return float(value[0]), value[1]
    return None


def event_id(kind: str, app: str, channel: str, period: Period) -> str:
    """The id of a channel event: the same on every node that tells the same period's
    event, so a receiver that drops repeated ids gets it once."""
    name = json.dumps([kind, app, channel, period[0], period[1]])
    return str(uuid.uuid5(_IDS, name))


def vacated_last(me: str, answers: dict[str, dict[str, Any]]) -> bool:
    """Does this node's local 1 -> 0 leave the channel empty everywhere that answered?"""
    return not holders(me, answers)


# -- the node's side ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    active: bool
    at: float  # wall clock of the local transition
    since: float  # wall clock of the local 0 -> 1 this belongs to


class Occupancy:
    """Answers the other nodes' ``occupancy`` asks, and turns this node's transitions into
    channel events through ``emit(type, app, channel, at, id)``."""

    def __init__(self, node_id: str, presence: Presence, query: MeshQuery | None, *,
                 emit: Callable[[str, str, str, float, str], None], grace: float, limit: int,
                 count_drop: Callable[[str, int], None], timeout: float) -> None:
        self.node_id, self.presence, self.query = node_id, presence, query
        self.limit, self.timeout = limit, timeout
        self._emit, self._count_drop = emit, count_drop
        self.grace: Grace[tuple[str, str], float] = Grace(grace, self._vacant)
        #: (app, channel) -> wall clock of its local 0 -> 1, while it has local members.
        self._since: dict[tuple[str, str], float] = {}
        #: (app, channel) -> the period its local members are part of, once decided.
        self._period: dict[tuple[str, str], Period] = {}
        self._chains: dict[tuple[str, str], deque[Change]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._asks = asyncio.Semaphore(CONCURRENT_ASKS)
        self.pending = 0
        self.asks = 0
        self.ask_failures = 0

    def start(self) -> None:
        if self.query is not None:
            self.query.handle(KIND, self.answer)

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """Another node asks: how many local members, since when? (A vacancy still in its
        grace period counts as one member.)"""
        app, channel = body.get("app"), body.get("channel")
        if not isinstance(app, str) or not isinstance(channel, str):
            return {"error": "occupancy needs app and channel (strings)"}
        key = (app, channel)
        realm = self.presence.realms.get(app)
        local = realm.channels.get(channel) if realm is not None else None
        members = (len(local.peers) if local is not None else 0) + (key in self.grace)
        if not members:
            return {"members": 0, "since": None, "period": None}
        period = self._period.get(key)
        # Set by changed() right after the rules register the peer; 'now' between the two.
        return {"members": members, "since": self._since.get(key, time.time()),
                "period": list(period) if period is not None else None}

    def changed(self, app: str, channel: str, active: bool, now: float) -> None:
        """The rules' Interest: O(1), never awaits; the decision is made by a task."""
        key = (app, channel)
        if not active:
            self.grace.hold(key, now)
        elif not self.grace.cancel(key):  # back within the grace period: still occupied
            self._since[key] = now
            self._queue(key, Change(True, now, now))

    def _vacant(self, key: tuple[str, str], at: float) -> None:
        since = self._since.pop(key, at)
        self._queue(key, Change(False, at, since))

    def _queue(self, key: tuple[str, str], change: Change) -> None:
        if self.pending >= self.limit:
            self._count_drop("webhook_occupancy_full", 1)
            return
        self.pending += 1
        chain = self._chains.get(key)
        if chain is None:
            chain = self._chains[key] = deque()
            task = asyncio.get_running_loop().create_task(self._work(key, chain))
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)
        chain.append(change)

    async def _work(self, key: tuple[str, str], chain: deque[Change]) -> None:
        try:
            while chain:
                async with self._asks:
                    await self._decide(key, chain[0])
                chain.popleft()
                self.pending -= 1
        finally:
            if self._chains.get(key) is chain:
                del self._chains[key]

    async def _decide(self, key: tuple[str, str], change: Change) -> None:
        app, channel = key
        answers: dict[str, dict[str, Any]] = {}
        if self.query is not None:
            self.asks += 1
            try:
                async with asyncio.timeout(self.timeout):
                    answers = (await self.query.ask(KIND, {"app": app, "channel": channel})
                               ).answers
            except Exception as exc:  # the mesh could not be asked: decide as if alone
                self.ask_failures += 1
                if self.ask_failures % 100 == 1:
                    log.warning("occupancy ask failed error=%s failures=%d (deciding alone)",
                                type(exc).__name__, self.ask_failures)
        log.debug("occupancy %s app=%s channel=%s answers=%s", "occupied" if change.active
                  else "vacated", app, channel, answers)
        if change.active:
            first, period = occupied(self.node_id, change.since, answers)
            self._period[key] = period
            if first:
                self._emit("channel_occupied", app, channel, change.at,
                           event_id("channel_occupied", app, channel, period))
            return
        period = self._period.pop(key, (change.since, self.node_id))
        if vacated_last(self.node_id, answers):
            self._emit("channel_vacated", app, channel, change.at,
                       event_id("channel_vacated", app, channel, period))

    async def aclose(self) -> None:
        """The node stops: vacancies in their grace period are decided now, within
        STOP_DECIDE seconds; decisions still waiting then are dropped (counted)."""
        self.grace.flush()
        if self._workers:
            _done, late = await asyncio.wait(set(self._workers), timeout=STOP_DECIDE)
            for task in late:
                task.cancel()
            for task in late:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.pending:
            log.warning("occupancy decisions undone at stop n=%d", self.pending)
            self._count_drop("webhook_undecided", self.pending)
            self.pending = 0
