"""A node's home NATS server: probing it while away, and delivering once across a move back.

``mesh/nats.py`` moves a node back to its home server (the first of ``NATS_URL``) once home
has answered every probe for ``NATS_FAILBACK_AFTER`` seconds (jittered per node). This
module holds the parts with no connection of their own:

- :func:`probe`: is the server there? A TCP connect, its ``INFO`` line (not in lame-duck
  mode) and, where the server asks for no credentials or TLS, a ``PING``/``PONG``. No
  subscription, no ``CONNECT`` with credentials: cheap for the server and quiet in its log.
- :class:`HomeWatch`: how long home has been healthy; one failed probe starts it over, so a
  home server that flaps never pulls a node back.
- :class:`Overlap`: while the old and the new receiving connection are both subscribed, a
  message can arrive on both. Old-connection messages are delivered as they come (and
  remembered); new-connection messages are held until the old connection is drained, then
  delivered except the copies already delivered.
- :class:`FailBack`: home or away and for how long, the probe loop, and the move itself
  (why it neither loses nor doubles: :meth:`FailBack.move`; docs/mesh.md, "Home server and
  fail-back").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import time
from collections import Counter, deque
from typing import Any
from urllib.parse import urlsplit

# mesh/nats.py's NatsBus and its _Connection; not imported (even for typing: nats.py imports
# this module, and tests/test_imports.py keeps mesh/ free of cycles).
NatsBus = Any
_Connection = Any

log = logging.getLogger("prscd.mesh.nats")

#: Seconds both receiving connections stay subscribed: time for the new subscriptions'
#: interest to reach every server of the supercluster (one gateway hop, well under 1 s at
#: the distances in docs/mesh.md), so nothing published meanwhile misses both.
OVERLAP = 1.0
#: Seconds for the home connections to open, and for a marker sent through the old server
#: to reach home (is the route between them up?), before a move is given up (the node stays
#: where it is and tries later, waiting twice as long each time, up to 16x).
CONNECT_TIMEOUT = 5.0
MARKER_TIMEOUT = 5.0
#: The route is up; publishes are held until a second marker gets through: at most this.
HOLD_TIMEOUT = 2.0
DRAIN_TIMEOUT = 5.0
#: After the cut, copies still arriving over the new path are dropped until none came for
#: OVERLAP, but at most this long: a backlogged gateway link can bring the new path's copy
#: of a message more than a second after the old path delivered it (seen once in CI: two
#: messages doubled when the window was a fixed OVERLAP).
COPIES_MAX = 10.0


async def probe(url: str, timeout: float = 2.0) -> str:
    """``""`` when the server at ``url`` answers like a healthy NATS server, else why not."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            line = await reader.readline()
            if not line.startswith(b"INFO "):
                return f"no INFO line (got {line[:40]!r})"
            info = json.loads(line[5:])
            if info.get("ldm"):
                return "lame duck mode (shutting down)"
            if info.get("auth_required") or info.get("tls_required"):
                return ""  # a PING before CONNECT would be an auth error in its log
            writer.write(b"PING\r\n")
            await writer.drain()
            line = await reader.readline()
            return "" if line.startswith(b"PONG") else f"no PONG (got {line[:40]!r})"
    except TimeoutError:
        return f"no answer in {timeout:.1f}s"
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if writer is not None:
            writer.close()


class HomeWatch:
    """Home is ready to move back to once every probe for ``after`` seconds succeeded."""

    def __init__(self, after: float) -> None:
        self.after = after
        self.healthy_since: float | None = None

    def healthy_for(self, now: float) -> float:
        return 0.0 if self.healthy_since is None else now - self.healthy_since

    def note(self, healthy: bool, now: float) -> bool:
        """Record one probe; True when home has now been healthy for ``after`` seconds."""
        if not healthy:
            self.healthy_since = None
            return False
        if self.healthy_since is None:
            self.healthy_since = now
        return now - self.healthy_since >= self.after

    def reset(self) -> None:
        self.healthy_since = None


class Overlap:
    """Both receiving connections subscribed: deliver each message once.

    A message is keyed by (subscription, subject, payload): the two copies of one
    publication are equal, and one node's events on one subject are in its send order on
    either path. ``limit`` bounds what is remembered and held (the move cuts the overlap
    short when it is reached).
    """

    def __init__(self, old: Any, new: Any, limit: int = 100_000) -> None:
        self.old, self.new = old, new
        self.limit = limit
        self.holding = True
        self.held: deque[tuple[Any, Any]] = deque()
        self.seen: Counter[tuple[int, str, bytes]] = Counter()
        self.remembered = 0
        self.duplicates = 0
        self.full = asyncio.Event()
        self.started = time.monotonic()
        #: The last subscription made on the new connection (a join during the move).
        self.last_attach = self.started
        #: When the old connection was drained (the cut), and the last copy dropped.
        self.cut_at = self.last_copy = self.started

    def accept(self, sub: Any, conn: Any, msg: Any) -> bool:
        """True: deliver now. False: held (new connection, old not drained) or a copy."""
        key = (id(sub), msg.subject, msg.data)
        if conn is self.old:
            self.seen[key] += 1
            self._grow()
            return True
        if conn is not self.new:
            return True
        if self.holding:
            self.held.append((sub, msg))
            self._grow()
            return False
        return not self.copy(key)

    def copy(self, key: tuple[int, str, bytes]) -> bool:
        """``key`` was already delivered from the old connection: drop this copy."""
        if self.seen.get(key, 0) <= 0:
            return False
        self.seen[key] -= 1
        if not self.seen[key]:
            del self.seen[key]
        self.duplicates += 1
        self.last_copy = time.monotonic()
        return True

    def key(self, sub: Any, msg: Any) -> tuple[int, str, bytes]:
        return (id(sub), msg.subject, msg.data)

    def _grow(self) -> None:
        self.remembered += 1
        if self.remembered >= self.limit:
            self.full.set()


class _Abort(Exception):
    """A move home given up before anything was swapped: the node stays where it is."""


class FailBack:
    """Where the bus is (home or away, for how long) and the move back home.

    ``after`` is ``NATS_FAILBACK_AFTER``; this node waits ``after`` times a factor drawn once
    in [1, 1.5), so a region's nodes, which lost and see home again together, move back
    spread over half the period instead of all at once. 0 turns fail-back off.
    """

    def __init__(self, bus: NatsBus, url: str, label: str, after: float) -> None:
        self.bus, self.url, self.label = bus, url, label
        parts = urlsplit(url)
        self.home = (parts.hostname, parts.port or 4222)
        self.after = after * random.uniform(1.0, 1.5) if after > 0 else 0.0
        self.watch = HomeWatch(self.after)
        self.away_since: float | None = None
        self.away_total = 0.0
        self.moved_away = 0
        self.failbacks = 0
        self.aborts = 0
        self.aborts_in_row = 0
        self.copies_dropped = 0
        self.moving = False
        self.task: asyncio.Task[None] | None = None
        self._incoming: list[_Connection] = []

    # -- where the bus is ------------------------------------------------------------

    def at_home(self) -> bool | None:
        """None while a connection is down (nowhere to be)."""
        conns = self.bus.connections
        if not conns or not all(c.nc.is_connected for c in conns):
            return None
        return all(c.on_home(self.home) for c in conns)

    def track(self) -> None:
        """After any connection change: note (and log) leaving home or coming back."""
        home = None if self.moving else self.at_home()
        if home is None:
            return
        now = time.monotonic()
        if home and self.away_since is not None:
            away = now - self.away_since
            self.away_total += away
            self.away_since = None
            self.watch.reset()
            self.watch.after, self.aborts_in_row = self.after, 0
            log.info("nats back home on %s after %.1fs away (its own reconnect)", self.label, away)
        elif not home and self.away_since is None:
            self.away_since = now
            self.moved_away += 1
            server = self.server()
            then = (f"moving back once home has answered probes for {self.after:.1f}s "
                    "(NATS_FAILBACK_AFTER, with this node's jitter)" if self.after > 0 else
                    "NATS_FAILBACK_AFTER=0: staying until that server fails")
            log.warning("nats moved away from home server %s: now on %s, this node's mesh "
                        "traffic goes through that server; %s", self.label, server, then)

    def server(self) -> str:
        return next((c.server() for c in self.bus.connections if c.server()), "")

    def where(self) -> dict[str, Any]:
        now = time.monotonic()
        away = now - self.away_since if self.away_since is not None else 0.0
        server = self.server()
        return {
            "server": server,
            "home_server": self.label,
            "home": bool(server) and self.away_since is None,
            "away_s": round(away, 1),
            "away_total_s": round(self.away_total + away, 1),
            "moved_away": self.moved_away,
            "failbacks": self.failbacks,
            "failback_aborts": self.aborts,
            "failback_after_s": round(self.after, 1),
            "home_healthy_s": round(self.watch.healthy_for(now), 1),
            "copies_dropped": self.copies_dropped + (self.bus._overlap.duplicates
                                                     if self.bus._overlap is not None else 0),
        }

    # -- probing home -------------------------------------------------------------------

    def start(self) -> None:
        if self.after > 0 and len(self.bus.servers) > 1 and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        interval = min(2.0, max(0.1, self.after / 10))
        while not self.bus.closing:
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
            if self.away_since is None or not self.bus.up or self.moving:
                self.watch.reset()
                continue
            why = await probe(self.url, timeout=min(2.0, self.after))
            now = time.monotonic()
            was = self.watch.healthy_since
            ready = self.watch.note(not why, now)
            if not why and was is None:
                log.info("nats home server %s answers again (away %.1fs): moving back once it "
                         "stays healthy for %.1fs", self.label, now - self.away_since,
                         self.watch.after)
            elif why and was is not None:
                log.warning("nats home server %s failed a probe after %.1fs healthy (%s): not "
                            "moving back; the %.1fs start over", self.label, now - was, why,
                            self.watch.after)
            elif why:
                log.debug("nats home server %s probe: %s", self.label, why)
            if ready:
                healthy = self.watch.healthy_for(now)
                self.watch.reset()
                try:
                    await self.move(healthy)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("nats move back home failed")

    # -- the move -------------------------------------------------------------------

    async def move(self, healthy: float) -> None:
        """Make-before-break: open home connections, subscribe there, then swap.

        No loss: the old receiving connection keeps every subscription until the new one has
        had them for ``OVERLAP`` (their interest reached every server), and is then drained
        (nats-py's drain: UNSUB, a round trip, every message already received handled), so
        each publication reaches at least one of the two. No double: the copies are told apart
        by ``Overlap``. Order: old-connection messages are delivered as they come, the new
        connection's are held until the old one is drained; and the Source swaps only after a
        marker sent through the old server reached home (publishes meanwhile are held, in
        order), so what the node sent before the swap is ahead of what it sends after.
        """
        bus = self.bus
        old_src, old_sf = bus._src, bus._sf
        start = time.monotonic()
        away = start - (self.away_since or start)
        log.info("nats moving back to home server %s from %s: home healthy for %.1fs, "
                 "away %.1fs", self.label, self.server(), healthy, away)
        self.moving = True
        new_src = bus._replacement(old_src) if old_src is not None else None
        new_sf = bus._replacement(old_sf) if old_sf is not None else None
        new = [c for c in (new_src, new_sf) if c is not None]
        self._incoming = new
        overlap: Overlap | None = None
        held, held_for = 0, 0.0
        try:
            try:
                overlap = await self._prepare(new, old_sf, new_sf)
                sender, listener = old_src or old_sf, new_sf or new_src
                assert sender is not None and listener is not None
                await self._marker(sender, listener, MARKER_TIMEOUT)  # nothing held yet
                if old_src is not None and new_src is not None:
                    held_for = time.monotonic()
                    bus._held = deque()
                    await self._marker(old_src, listener, HOLD_TIMEOUT)
            except (_Abort, Exception) as exc:
                await self._abandon(new, exc)
                return
            if old_src is not None and new_src is not None:
                bus._src = new_src
                held = await bus._release_held()
                held_for = time.monotonic() - held_for
                old_src.retired = True
                await old_src.close()  # flushes what it still had
            if overlap is not None and old_sf is not None and new_sf is not None:
                await self._cut(overlap, old_sf, new_sf)
        finally:
            self.moving = False
            self._incoming = []
        self.failbacks += 1
        self.aborts_in_row = 0
        self.watch.after = self.after
        now = time.monotonic()
        if self.away_since is not None:
            self.away_total += now - self.away_since
            self.away_since = None
        bus._recompute()
        log.info("nats back home on %s after %.1fs away: move took %.2fs (publishes held "
                 "%.0f ms: %d; copies dropped: %d)", self.label, away, now - start,
                 held_for * 1000, held, overlap.duplicates if overlap else 0)

    async def _prepare(self, new: list[_Connection], old_sf: _Connection | None,
                       new_sf: _Connection | None) -> Overlap | None:
        bus = self.bus
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await asyncio.gather(*(c.open(bus._home_options(c.name)) for c in new))
        except Exception as exc:
            raise _Abort(f"cannot connect: {type(exc).__name__}: {exc}"[:200]) from None
        for c in new:
            if not c.on_home(self.home):
                raise _Abort(f"{c.role} connected to {c.server()}, not home")
            c.nc.set_server_pool(bus.servers)  # later failures fail over as before
        if old_sf is None or new_sf is None:
            return None
        overlap = Overlap(old_sf, new_sf)
        bus._overlap = overlap
        for sub in list(bus._subs):
            await bus._attach_next(sub, new_sf)
        await new_sf.nc.flush(timeout=2)
        return overlap

    async def _marker(self, old: _Connection, listener: _Connection, timeout: float) -> None:
        """Wait until a message sent on ``old`` after everything else reached home."""
        subject = f"_PRSCD_HOME.{secrets.token_hex(8)}"
        arrived = asyncio.Event()

        async def got(_msg: Any) -> None:
            arrived.set()

        sub = await listener.nc.subscribe(subject, cb=got)
        await listener.nc.flush(timeout=2)
        try:
            deadline = time.monotonic() + timeout
            while not arrived.is_set():
                if time.monotonic() > deadline:
                    raise _Abort(f"nothing sent through {old.server()} reached home in "
                                 f"{timeout:.0f}s (the route between them not up yet?)")
                await old.nc.publish(subject, b"")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), 0.25)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _cut(self, overlap: Overlap, old_sf: _Connection, new_sf: _Connection) -> None:
        bus = self.bus
        # OVERLAP after the last subscription made on the new connection (a channel joined
        # during the move needs its time too), at most 3 x OVERLAP in all.
        while not overlap.full.is_set():
            now = time.monotonic()
            rest = min(OVERLAP - (now - overlap.last_attach),
                       3 * OVERLAP - (now - overlap.started))
            if rest <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(overlap.full.wait(), rest)
        with contextlib.suppress(Exception):
            await new_sf.nc.flush(timeout=2)  # home has every subscription
        bus._sf = new_sf
        old_sf.retired = True
        try:
            await asyncio.wait_for(old_sf.nc.drain(), DRAIN_TIMEOUT)
        except Exception as exc:  # already down: what it had not delivered comes from new
            log.warning("nats draining the old stream-function connection failed: %s", exc)
        await old_sf.close()
        for sub in list(bus._subs):
            if sub.next is not None:
                sub.sub, sub.next = sub.next, None
            sub.conn = new_sf
        while overlap.held:
            sub, msg = overlap.held.popleft()
            if sub.active and not overlap.copy(overlap.key(sub, msg)):
                await sub.deliver(msg)
        overlap.holding = False
        overlap.cut_at = time.monotonic()
        # Copies still on their way over the new path are dropped for one more OVERLAP, and
        # for as long as they keep coming (up to COPIES_MAX).
        asyncio.get_running_loop().call_later(OVERLAP, self._end_overlap, overlap)

    def _end_overlap(self, overlap: Overlap) -> None:
        now = time.monotonic()
        if (self.bus._overlap is overlap and now - overlap.last_copy < OVERLAP
                and now - overlap.cut_at < COPIES_MAX):
            asyncio.get_running_loop().call_later(OVERLAP, self._end_overlap, overlap)
            return
        if self.bus._overlap is overlap:
            self.bus._overlap = None
        self.copies_dropped += overlap.duplicates
        if overlap.last_copy - overlap.cut_at > OVERLAP:
            log.info("nats copies over the new path kept coming %.1fs after the old connection "
                     "was drained (a slow gateway link); %d dropped in all",
                     overlap.last_copy - overlap.cut_at, overlap.duplicates)

    async def _abandon(self, new: list[_Connection], exc: BaseException) -> None:
        bus = self.bus
        bus._overlap = None
        await bus._release_held()
        for sub in list(bus._subs):
            sub.next = None
        for c in new:
            c.retired = True
            await c.close()
        self.aborts += 1
        self.aborts_in_row += 1
        self.watch.after = self.after * min(2 ** self.aborts_in_row, 16)
        why = str(exc) if isinstance(exc, _Abort) else f"{type(exc).__name__}: {exc}"[:200]
        log.warning("nats move back to home server %s given up: %s; staying on %s, trying "
                    "again once home has been healthy for %.1fs", self.label, why,
                    self.server(), self.watch.after)

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        # Stopped mid-move: what was held (a goodbye) still goes out on the current Source.
        self.bus._overlap = None
        await self.bus._release_held()
        for c in self._incoming:
            c.retired = True
            await c.close()
