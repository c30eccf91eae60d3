"""Membership webhooks: batched, signed, retried POSTs, never on a peer's path.

The node hands :class:`Webhooks` the rules' :class:`node.presence.Member` and
``Interest`` actions; each becomes, at most, an event in a bounded queue (O(1), never
awaits). One task sends the queue in batches (up to ``BATCH_MAX`` events, or
``BATCH_WINDOW`` seconds after the first queued one) as
``POST {"events": [...]}``, signed ``X-Prscd-Signature: t=<unix s>,v1=<hex HMAC-SHA256>``
over ``t + "." + body``. One batch is in flight at a time, so the receiver sees events
in the order the node queued them. A batch is retried with capped, jittered exponential
backoff on 5xx, 408, 429, timeouts and connection errors, until it is accepted (2xx)
or the node stops; any other answer means the receiver refuses it: dropped, counted.
A full queue drops new events, counted. What the receiver is promised: docs/webhooks.md.

* A member's ``member_left`` is held for ``WEBHOOK_GRACE`` seconds (:mod:`node.grace`):
  back within it, nothing is sent. Channel events come from :mod:`node.occupancy`.
* The URL may carry credentials (sent as Basic auth): only scheme, host and port are
  ever logged; the secret is in no log, dump or metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp

from node.grace import Grace
from node.occupancy import Occupancy
from node.outbound import client_session, redact_url, split_credentials
from node.presence import Member

if TYPE_CHECKING:
    from mesh.query import MeshQuery
    from node.config import Settings
    from node.presence import Presence

log = logging.getLogger("prscd.webhooks")

BATCH_MAX = 100
BATCH_WINDOW = 1.0
#: Retry delays: BACKOFF_BASE * 2^(attempt-1), capped, each scaled by a random 0.5-1.0.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
#: At the node's stop, the queue left gets this long for one last attempt per batch.
STOP_FLUSH = 2.0
#: A drop is logged the first time, then every this many (not one line per event).
DROP_LOG_EVERY = 1000
#: Answer bodies are read (for keep-alive) up to this much, then the connection is dropped.
MAX_REPLY_BYTES = 64 * 1024
#: Signatures older than this are refused by :func:`verify` (replays).
SIGNATURE_TOLERANCE = 300.0

SIGNATURE_HEADER = "X-Prscd-Signature"


# -- the signature, on both ends -------------------------------------------------------------


def sign(secret: str, body: bytes, t: int) -> str:
    """The ``X-Prscd-Signature`` value for ``body`` sent at unix second ``t``."""
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256)
    return f"t={t},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, *, now: float,
           tolerance: float = SIGNATURE_TOLERANCE) -> bool:
    """A receiver's check: ``header`` signs ``body`` with ``secret``, made within
    ``tolerance`` seconds of ``now``. Any ``v1`` may match (a secret being rotated)."""
    t, v1 = None, []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            t = int(value)
        elif name == "v1":
            v1.append(value)
    if t is None or not v1 or abs(now - t) > tolerance:
        return False
    expected = sign(secret, body, t).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, v) for v in v1)


# -- retries -----------------------------------------------------------------------------------


def backoff(attempt: int, rand: float) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): doubling from BACKOFF_BASE up to
    BACKOFF_CAP, times 0.5-1.0 (``rand`` in [0, 1)) so that nodes do not retry in step."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(attempt - 1, 32)) * (0.5 + rand / 2)


def batch_due(queued: int, first_at: float, now: float, *, batch_max: int = BATCH_MAX,
              window: float = BATCH_WINDOW) -> float:
    """Seconds until the next batch goes (0 = now): at once when ``batch_max`` events
    wait, else ``window`` after the first of them was queued (at ``first_at``)."""
    return 0.0 if queued >= batch_max else max(0.0, first_at + window - now)


def retryable(status: int) -> bool:
    """Is this answer worth another attempt? (Else 2xx is done, the rest is refused.)"""
    return status >= 500 or status in (408, 429)


def iso_ms(at: float) -> str:
    """Unix seconds as ISO-8601 UTC with milliseconds: ``2024-05-01T12:00:00.123Z``."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


# -- events ---------------------------------------------------------------


@dataclass(slots=True)
class Event:
    type: str
    app: str
    channel: str
    user_id: str | None
    at: float  # wall clock, unix seconds
    #: Channel events come with theirs (node/occupancy.py's event_id); else one is made.
    id: str = ""
    queued: float = 0.0  # loop time it was queued (the batch window)

    def json(self, mesh_id: str) -> dict[str, Any]:
        # Made once, when its batch is built: every retry carries the same id.
        return {"id": self.id or str(uuid.uuid4()), "type": self.type, "app": self.app,
                "channel": self.channel, "user_id": self.user_id, "mesh_id": mesh_id,
                "at": iso_ms(self.at)}


# -- the sender ------------------------------------------------------------------------------


@dataclass(slots=True)
class SenderStats:
    batches_sent: int = 0
    events_sent: int = 0
    #: Attempts that failed and were tried again.
    batches_retried: int = 0
    #: Batches refused by the receiver (4xx) or still undelivered when the node stopped.
    batches_failed: int = 0
    drops: dict[str, int] = field(default_factory=dict)


class Sender:
    """The bounded queue and the one task that delivers it (see the module docstring)."""

    def __init__(self, url: str, secret: str, *, mesh_id: str, timeout: float, limit: int,
                 count_drop: Callable[[str, int], None], batch_max: int = BATCH_MAX,
                 window: float = BATCH_WINDOW, stop_flush: float = STOP_FLUSH,
                 rand: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.time) -> None:
        self.url = url  # may carry credentials: never logged (redact_url)
        self.mesh_id, self.timeout, self.limit = mesh_id, timeout, limit
        self.batch_max, self.window, self.stop_flush = batch_max, window, stop_flush
        self._secret, self._count_drop, self._rand, self._clock = secret, count_drop, rand, clock
        self._target, credentials = split_credentials(url)
        self._headers = {"Content-Type": "application/json", **credentials}
        self.stats = SenderStats()
        #: Held elsewhere but waiting for delivery too (the grace window): counts to the bound.
        self.held: Callable[[], int] = lambda: 0
        self._queue: deque[Event] = deque()
        self._inflight: list[Event] = []
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._time: Callable[[], float] = time.monotonic

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._time = loop.time
        self._task = loop.create_task(self._run(), name="webhook-sender")

    def full(self) -> bool:
        return len(self._queue) + len(self._inflight) + self.held() >= self.limit

    def put(self, event: Event) -> bool:
        """Queue one event: O(1), never awaits. False (dropped, counted) when full."""
        if self.full():
            self.drop("webhook_queue_full", 1)
            return False
        event.queued = self._time()
        self._queue.append(event)
        if len(self._queue) == 1 or len(self._queue) >= self.batch_max:
            self._wake.set()  # a window starts, or a batch is full
        return True

    def drop(self, reason: str, n: int) -> None:
        """Count ``n`` events dropped for ``reason``; log the first, then every
        DROP_LOG_EVERY-th."""
        before = self.stats.drops.get(reason, 0)
        self.stats.drops[reason] = before + n
        self._count_drop(reason, n)
        if before == 0 or before // DROP_LOG_EVERY != (before + n) // DROP_LOG_EVERY:
            log.warning("webhook events dropped reason=%s n=%d total=%d url=%s", reason, n,
                        before + n, redact_url(self.url))

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._stopping.is_set():
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            due = batch_due(len(self._queue), self._queue[0].queued, self._time(),
                            batch_max=self.batch_max, window=self.window)
            if due > 0 and not self._stopping.is_set():
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due):
                        await self._wake.wait()  # a full batch, or the stop
                continue
            n = min(self.batch_max, len(self._queue))
            self._inflight = [self._queue.popleft() for _ in range(n)]
            await self._deliver(self._inflight)
            self._inflight = []

    async def _deliver(self, batch: list[Event]) -> None:
        body = json.dumps({"events": [e.json(self.mesh_id) for e in batch]},
                          separators=(",", ":")).encode()
        attempt = 0
        while True:
            attempt += 1
            status, why, retry_after = await self._attempt(body)
            if status is not None and 200 <= status < 300:
                self.stats.batches_sent += 1
                self.stats.events_sent += len(batch)
                return
            if status is not None and not retryable(status):
                self.stats.batches_failed += 1
                log.warning("webhook refused a batch status=%d events=%d url=%s", status,
                            len(batch), redact_url(self.url))
                self.drop("webhook_refused", len(batch))
                return
            if self._stopping.is_set():
                self._give_up(len(batch), why)
                return
            self.stats.batches_retried += 1
            delay = max(backoff(attempt, self._rand()), min(retry_after, BACKOFF_CAP))
            log.warning("webhook delivery failed attempt=%d error=%s retry_in=%.1fs events=%d "
                        "url=%s", attempt, why, delay, len(batch), redact_url(self.url))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()  # the stop makes one last attempt at once

    def _give_up(self, n: int, why: str, batches: int = 1) -> None:
        self.stats.batches_failed += batches
        log.warning("webhook batch undelivered at stop error=%s events=%d url=%s", why, n,
                    redact_url(self.url))
        self.drop("webhook_undelivered", n)

    async def _attempt(self, body: bytes) -> tuple[int | None, str, float]:
        """One POST: (status or None, what failed, the Retry-After seconds or 0)."""
        t = int(self._clock())
        headers = dict(self._headers)
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, body, t)
        try:
            async with asyncio.timeout(self.timeout):
                async with self._open().post(self._target, data=body, headers=headers,
                                             allow_redirects=False) as resp:
                    read = 0  # for keep-alive, a small answer is read to its end
                    while read <= MAX_REPLY_BYTES and (chunk := await resp.content.read(8192)):
                        read += len(chunk)
                    return resp.status, f"status {resp.status}", _seconds(resp.headers)
        except TimeoutError:
            return None, f"no answer within {self.timeout:g}s", 0.0
        except (aiohttp.ClientError, OSError) as exc:
            # The type only: aiohttp's messages name hosts and paths.
            return None, type(exc).__name__, 0.0

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = client_session(self.timeout, limit=4)
        return self._session

    async def aclose(self) -> None:
        """The node stops: what is queued gets one last attempt per batch, within
        ``stop_flush`` seconds in all; what is left is dropped (counted, one log line)."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.stop_flush)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            left = len(self._queue) + len(self._inflight)
            if left:
                batches = bool(self._inflight) + -(-len(self._queue) // self.batch_max)
                self._give_up(left, f"stop deadline {self.stop_flush:g}s", batches)
                self._queue.clear()
                self._inflight = []
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _seconds(headers: Any) -> float:
    """Retry-After in seconds (the delay form only), or 0."""
    value = headers.get("Retry-After", "")
    return float(value) if value.isdigit() else 0.0


# -- what the node calls -----------------------------------------------------------------------


class Webhooks:
    """Membership events from the node's actions to the sender: ``member`` and
    ``channel`` are called from the node's one pass over the actions and never await."""

    def __init__(self, settings: Settings, *, node_id: str, presence: Presence,
                 count_drop: Callable[[str, int], None], query: MeshQuery | None = None
                 ) -> None:
        self.sender = Sender(settings.webhook_url, settings.webhook_secret,
                             mesh_id=settings.mesh_id, timeout=settings.webhook_timeout,
                             limit=settings.webhook_queue, count_drop=count_drop)
        self.grace: Grace[tuple[str, str, str], Event] = Grace(
            settings.webhook_grace, lambda _key, event: self._put(event))
        self.occupancy = Occupancy(node_id, presence, query, emit=self._channel_event,
                                   grace=settings.webhook_grace, limit=settings.webhook_queue,
                                   count_drop=self.sender.drop,
                                   timeout=settings.webhook_timeout)
        self.sender.held = lambda: len(self.grace) + self.occupancy.pending
        self._signed = bool(settings.webhook_secret)

    def start(self) -> None:
        self.sender.start()
        self.occupancy.start()
        log.info("webhooks on url=%s signed=%s grace=%gs queue=%d",
                 redact_url(self.sender.url), self._signed, self.grace.seconds,
                 self.sender.limit)
        if not self._signed:
            log.warning("WEBHOOK_SECRET is empty: webhook requests are not signed")

    def member(self, action: Member) -> None:
        key = (action.app, action.channel, action.client_id)
        if action.joined:
            if not self.grace.cancel(key):  # back within the grace period: never left
                self._put(Event("member_joined", *key, time.time()))
        elif self.sender.full():
            self.sender.drop("webhook_queue_full", 1)
        elif action.after_grace:  # held by presence's grace period already (node/grace.py)
            self._put(Event("member_left", *key, time.time()))
        else:
            self.grace.hold(key, Event("member_left", *key, time.time()))

    def channel(self, app: str, channel: str, active: bool) -> None:
        self.occupancy.changed(app, channel, active, time.time())

    def _channel_event(self, kind: str, app: str, channel: str, at: float, id_: str) -> None:
        self._put(Event(kind, app, channel, None, at, id_))

    def _put(self, event: Event) -> None:
        self.sender.put(event)

    async def aclose(self) -> None:
        """After the node's peers went offline: held events go out now, the channels'
        last decisions are made, the queue gets its last attempt, the client closes."""
        self.grace.flush()
        await self.occupancy.aclose()
        await self.sender.aclose()

    def stats(self) -> dict[str, Any]:
        s = self.sender.stats
        return {"queued": self.sender.queued, "held": len(self.grace),
                "batches_sent": s.batches_sent, "events_sent": s.events_sent,
                "batches_retried": s.batches_retried, "batches_failed": s.batches_failed,
                "occupancy_asks": self.occupancy.asks}
