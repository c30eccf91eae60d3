"""The NATS bus: two nats-py connections, a Source (publish) and a Stream Function (subscribe).

The seed runs a YoMo source and a stream function as two connections; this bus does the
same, named ``YOMO_SNDR_NAME`` and ``YOMO_RCVR_NAME``, so an operator sees both in the
server's ``/connz``. Everything a node publishes goes through the one Source connection,
so NATS keeps per-sender order end to end (also across gateways).

Connection policy:

- ``NATS_URL`` lists servers in order of preference (``nats://a:4222,nats://b:4222``);
  the list is not shuffled. After a disconnect the preferred server that failed least
  is tried first, at once; when every server has failed, waits grow from
  ``NATS_RECONNECT_WAIT`` to ``NATS_RECONNECT_MAX_WAIT`` (with jitter), forever.
- The client pings every ``NATS_PING_INTERVAL`` seconds and gives up on a link after two
  unanswered pings, so a dead link is noticed in seconds, not nats-py's default minutes.
- A node whose NATS is unreachable at start-up still serves its local peers; the bus
  keeps trying in the background and ``/ready`` answers 503 until it is connected.
- Publishing while reconnecting is buffered by nats-py (and sent on reconnect); a
  publish that cannot be buffered raises, and the bridge counts it: it never reaches a
  peer's connection.
- The first server of ``NATS_URL`` is home. A node on another server probes home
  (``mesh/home.py``) and moves back once home has been healthy for ``NATS_FAILBACK_AFTER``
  seconds (times a per-node factor in [1, 1.5), so a region's nodes do not move in the same
  instant), make-before-break: ``FailBack.move`` (``mesh/home.py``).

States reported through ``_set_state`` (``/health`` shows them, ``/ready`` follows):
``connecting`` (never connected yet), ``connected`` (both connections up),
``reconnecting`` (was up, one of them is down), ``closed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from mesh.bus import (
    CLOSED,
    CONNECTED,
    CONNECTING,
    RECONNECTING,
    Bus,
    BusMessage,
    Handler,
    Subscription,
)
from mesh.home import FailBack, Overlap

if TYPE_CHECKING:
    from node.config import Settings

log = logging.getLogger("prscd.mesh.nats")

#: Publishes a move home may hold while it swaps the Source connection (a fraction of a
#: second); past this a publish fails and is counted like any other failed publish.
HOLD_LIMIT = 100_000


class BusUnavailable(ConnectionError):
    """Nothing can be sent: the connection was never established or is closed."""


def split_servers(nats_url: str) -> list[str]:
    servers = [s.strip() for s in nats_url.split(",") if s.strip()]
    out = []
    for s in servers:
        out.append(s if "://" in s else f"nats://{s}")
    return out


def redact(url: str) -> str:
    """A server URL fit for logs: credentials dropped."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def backoff(failures: int, base: float, cap: float) -> float:
    """Seconds to wait before the next attempt after ``failures`` consecutive failures."""
    if failures <= 0:
        return 0.0
    wait = min(cap, base * 2 ** (failures - 1))
    return wait * random.uniform(0.8, 1.2)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    if not (settings.nats_ca_file or settings.nats_cert_file
            or any(s.startswith("tls://") for s in split_servers(settings.nats_url))):
        return None
    ctx = ssl.create_default_context(cafile=settings.nats_ca_file or None)
    if settings.nats_cert_file:
        ctx.load_cert_chain(settings.nats_cert_file, settings.nats_key_file)
    return ctx


def connect_options(settings: Settings, name: str) -> dict[str, Any]:
    """nats-py ``connect()`` keyword arguments for one connection (credentials included)."""
    servers = split_servers(settings.nats_url)
    if not servers:
        raise ValueError("NATS_URL is empty")
    preference = {urlsplit(s).netloc: i for i, s in enumerate(servers)}
    base, cap = settings.nats_reconnect_wait, max(settings.nats_reconnect_max_wait,
                                                 settings.nats_reconnect_wait)

    def pick(pool: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
        # The most preferred server among those that failed least; no wait while an
        # untried server remains, then exponential backoff.
        best = min(pool, key=lambda s: (s.reconnects, preference.get(s.uri.netloc, 99)))
        return best, backoff(best.reconnects, base, cap)

    opts: dict[str, Any] = {
        "servers": servers,
        "name": name,
        "dont_randomize": True,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        # Used by the initial connect loop only; reconnects go through pick().
        "reconnect_time_wait": cap,
        "reconnect_to_server_handler": pick,
        "connect_timeout": 2,
        "ping_interval": settings.nats_ping_interval,
        "max_outstanding_pings": 2,
    }
    if settings.nats_user:
        opts["user"] = settings.nats_user
        opts["password"] = settings.nats_password
    if settings.nats_token:
        opts["token"] = settings.nats_token
    if settings.nats_creds_file or settings.nats_nkey_file:
        try:
            import nkeys  # noqa: F401
        except ImportError:
            raise RuntimeError(
                "NATS_CREDS_FILE / NATS_NKEY_FILE need the nkeys package: "
                "pip install 'nats-py[nkeys]'"
            ) from None
    if settings.nats_creds_file:
        opts["user_credentials"] = settings.nats_creds_file
    elif settings.nats_nkey_file:
        opts["nkeys_seed"] = settings.nats_nkey_file
    tls = tls_context(settings)
    if tls is not None:
        opts["tls"] = tls
    return opts


class _NatsSubscription(Subscription):
    def __init__(self, conn: _Connection, subject: str, handler: Handler) -> None:
        self.conn, self.subject, self.handler = conn, subject, handler
        self.sub: Any = None
        #: The same subscription on the connection a move home is opening.
        self.next: Any = None
        self.moving = False
        self.active = True

    async def on_msg(self, conn: _Connection, msg: Msg) -> None:
        move = conn.bus._overlap
        if move is not None and not move.accept(self, conn, msg):
            return  # held until the old connection is drained, or a copy already delivered
        await self.deliver(msg)

    async def deliver(self, msg: Msg) -> None:
        message = BusMessage(msg.subject, msg.data, dict(msg.headers) if msg.headers else None,
                             msg.reply or "")
        try:
            await self.handler(message)
        except Exception:
            log.exception("bus handler failed subject=%s", msg.subject)

    async def unsubscribe(self) -> None:
        self.active = False
        self.conn.waiting.discard(self)
        self.conn.bus._subs.discard(self)
        for sub in (self.sub, self.next):
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except Exception as exc:  # closed or reconnecting: the server forgets it
                    log.debug("unsubscribe failed subject=%s error=%s", self.subject, exc)
        self.sub = self.next = None


class _Connection:
    """One nats-py client and what it went through."""

    def __init__(self, bus: NatsBus, role: str, name: str) -> None:
        self.bus, self.role, self.name = bus, role, name
        self.nc = NatsClient()
        self.state = CONNECTING
        self.ever_connected = False
        self.task: asyncio.Task[None] | None = None
        #: Subscriptions made before the first connect; made for real once connected.
        self.waiting: set[_NatsSubscription] = set()
        self.errors = 0
        self.disconnects = 0
        self._last_error_log = 0.0
        #: Replaced by a move home: its callbacks no longer speak for the bus.
        self.retired = False

    def on_home(self, home: tuple[str | None, int | None]) -> bool:
        url = self.nc.connected_url
        return url is not None and (url.hostname, url.port or 4222) == home

    async def open(self, opts: dict[str, Any]) -> None:
        """Connect a connection that will replace a current one (a move home)."""
        await self.nc.connect(**opts, error_cb=self._on_error,
                              disconnected_cb=self._on_disconnected,
                              reconnected_cb=self._on_reconnected, closed_cb=self._on_closed)
        self.ever_connected = True
        self.state = CONNECTED

    def server(self) -> str:
        url = self.nc.connected_url
        return redact(url.geturl()) if url is not None else ""

    async def run_connect(self, opts: dict[str, Any]) -> None:
        try:
            await self.nc.connect(
                **opts,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                closed_cb=self._on_closed,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("nats %s connection gave up: %s", self.role, _describe(exc))
            self._change(CLOSED)
            return
        self.ever_connected = True
        log.info("nats %s connected name=%s server=%s", self.role, self.name, self.server())
        for sub in list(self.waiting):
            await self.bus._attach(self, sub)
        self.waiting.clear()
        self._change(CONNECTED)

    def _change(self, state: str) -> None:
        self.state = state
        self.bus._recompute()

    async def _on_error(self, exc: Exception) -> None:
        if self.retired:
            return
        self.errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= 5.0 or self.bus.debug:
            self._last_error_log = now
            log.warning("nats %s error: %s (errors so far: %d)", self.role, _describe(exc),
                        self.errors)

    async def _on_disconnected(self) -> None:
        if not self.ever_connected or self.bus.closing or self.retired:
            return
        self.disconnects += 1
        log.warning("nats %s disconnected: reconnecting", self.role)
        self._change(RECONNECTING)

    async def _on_reconnected(self) -> None:
        if self.retired:
            return
        log.info("nats %s reconnected server=%s", self.role, self.server())
        self._change(CONNECTED)

    async def _on_closed(self) -> None:
        if self.retired:
            self.state = CLOSED
            return
        if not self.bus.closing:
            log.error("nats %s connection closed", self.role)
        self._change(CLOSED)

    async def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.nc.is_connected:
            try:
                await self.nc.flush(timeout=1)
            except Exception as exc:
                log.debug("flush on close failed: %s", exc)
        try:
            await self.nc.close()
        except Exception as exc:
            log.debug("close failed: %s", exc)
        self.state = CLOSED


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


class NatsBus(Bus):
    """The mesh bus over NATS. ``send``/``receive`` pick the connections to open:
    a node has both; ``prscd publish`` only sends, ``prscd observe`` only receives."""

    kind = "nats"

    def __init__(self, settings: Settings, *, send: bool = True, receive: bool = True,
                 connect_wait: float = 2.0) -> None:
        super().__init__()
        self.settings = settings
        self.debug = settings.debug
        self.servers = split_servers(settings.nats_url)
        self.connect_wait = connect_wait
        self.closing = False
        self.publish_failed = 0
        self._src = _Connection(self, "source", settings.sndr_name) if send else None
        self._sf = _Connection(self, "stream-function", settings.rcvr_name) if receive else None
        self._up_event = asyncio.Event()
        #: Every live subscription (a move home makes each again on the new connection).
        self._subs: set[_NatsSubscription] = set()
        #: Set while a move home has both receiving connections subscribed (and a while after).
        self._overlap: Overlap | None = None
        #: Publishes held while a move home swaps the Source connection, in order.
        self._held: deque[tuple[str, bytes, dict[str, str] | None, str]] | None = None
        self.failback = FailBack(self, self.servers[0], redact(self.servers[0]),
                                 settings.nats_failback_after) if self.servers else None

    @property
    def connections(self) -> list[_Connection]:
        return [c for c in (self._src, self._sf) if c is not None]

    def _recompute(self) -> None:
        states = [c.state for c in self.connections]
        if self.closing or CLOSED in states:
            state = CLOSED
        elif all(s == CONNECTED for s in states):
            state = CONNECTED
        elif any(c.ever_connected for c in self.connections):
            state = RECONNECTING
        else:
            state = CONNECTING
        if state == CONNECTED:
            self._up_event.set()
        else:
            self._up_event.clear()
        self._set_state(state)
        if self.failback is not None:
            self.failback.track()

    async def connect(self) -> None:
        """Start connecting; return once connected or after ``connect_wait`` seconds."""
        self._set_state(CONNECTING)
        log.info("nats bus connecting servers=%s source=%s stream_function=%s",
                 ",".join(redact(s) for s in self.servers),
                 self._src.name if self._src else "-", self._sf.name if self._sf else "-")
        for conn in self.connections:
            opts = connect_options(self.settings, conn.name)
            conn.task = asyncio.get_running_loop().create_task(conn.run_connect(opts))
        if self.failback is not None:
            self.failback.start()
        if not await self.wait_up(self.connect_wait):
            log.warning("nats bus not connected after %.1fs: local peers are served, "
                        "the mesh keeps trying", self.connect_wait)

    async def wait_up(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._up_event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def publish(self, subject: str, data: bytes,
                      headers: dict[str, str] | None = None, *, reply: str = "") -> None:
        conn = self._src
        if conn is None:
            raise BusUnavailable("this bus does not send")
        if self._held is not None:  # a move home is swapping the Source connection
            if len(self._held) >= HOLD_LIMIT:
                self.publish_failed += 1
                raise BusUnavailable("moving home: too many publishes held")
            self._held.append((subject, data, headers, reply))
            return
        if not conn.ever_connected or conn.nc.is_closed:
            self.publish_failed += 1
            raise BusUnavailable(f"nats {conn.state}")
        try:
            # While reconnecting nats-py buffers (up to its pending size) and sends later.
            await conn.nc.publish(subject, data, reply=reply, headers=headers)
        except Exception:
            self.publish_failed += 1
            raise

    async def subscribe(self, subject: str, handler: Handler) -> Subscription:
        conn = self._sf
        if conn is None:
            raise BusUnavailable("this bus does not receive")
        sub = _NatsSubscription(conn, subject, handler)
        self._subs.add(sub)
        if conn.ever_connected:
            await self._attach(conn, sub)
        else:
            conn.waiting.add(sub)
        move = self._overlap
        if move is not None and move.holding and move.new is not conn:
            await self._attach_next(sub, move.new)
        return sub

    def new_inbox(self) -> str:
        """nats-py's inbox (``_INBOX.<nuid>``): answers come back to the stream-function
        connection, which subscribes ``<inbox>.*``; requests leave through the source."""
        conn = self._sf or self._src
        assert conn is not None
        return conn.nc.new_inbox()

    async def _attach(self, conn: _Connection, sub: _NatsSubscription) -> None:
        if not sub.active:
            return
        sub.sub = await conn.nc.subscribe(sub.subject, cb=functools.partial(sub.on_msg, conn))
        if conn.nc.is_connected:
            # The server has the interest before we answer the peer that caused it. nats-py
            # queues SUB for its flusher task but writes PING at once: let the flusher
            # run first, or the PONG can come back before the SUB was even sent.
            await asyncio.sleep(0)
            try:
                await conn.nc.flush(timeout=1)
            except Exception as exc:
                log.debug("flush after subscribe failed: %s", exc)

    async def _attach_next(self, sub: _NatsSubscription, conn: _Connection) -> None:
        """Subscribe ``sub`` on the connection a move home is opening (no flush: the move
        flushes once after all of them)."""
        if not sub.active or sub.next is not None or sub.moving:
            return
        sub.moving = True
        try:
            sub.next = await conn.nc.subscribe(sub.subject,
                                               cb=functools.partial(sub.on_msg, conn))
        finally:
            sub.moving = False
        if self._overlap is not None:
            self._overlap.last_attach = time.monotonic()
        if not sub.active:  # unsubscribed meanwhile
            with contextlib.suppress(Exception):
                await sub.next.unsubscribe()
            sub.next = None

    def where(self) -> dict[str, Any]:
        return self.failback.where() if self.failback is not None else {}

    def _replacement(self, conn: _Connection) -> _Connection:
        """A connection to take ``conn``'s place (same role and name) on a move home."""
        return _Connection(self, conn.role, conn.name)

    def _home_options(self, name: str) -> dict[str, Any]:
        opts = connect_options(self.settings, name)
        opts["servers"] = self.servers[:1]  # home only; the move widens the pool once there
        return opts

    async def _release_held(self) -> int:
        """Send what publish() held during a move, in order, on the current Source."""
        held, sent = self._held, 0
        if held is None:
            return 0
        conn = self._src
        while held:  # publish() appends here until the loop is done
            subject, data, headers, reply = held.popleft()
            try:
                assert conn is not None
                await conn.nc.publish(subject, data, reply=reply, headers=headers)
                sent += 1
            except Exception:
                self.publish_failed += 1
        self._held = None
        return sent

    async def flush(self, timeout: float = 1.0) -> None:
        for conn in self.connections:
            if conn.nc.is_connected:
                await conn.nc.flush(timeout=timeout)

    def stats(self) -> dict[str, Any]:
        return {
            "servers": [redact(s) for s in self.servers],
            "publish_failed": self.publish_failed,
            **self.where(),
            "connections": {
                c.role: {"name": c.name, "state": c.state, "server": c.server(),
                         "reconnects": c.nc.stats.get("reconnects", 0),
                         "errors": c.errors}
                for c in self.connections
            },
        }

    async def close(self) -> None:
        self.closing = True
        if self.failback is not None:
            await self.failback.close()
        # The source first: what it still holds (a goodbye) goes out before we stop.
        for conn in self.connections:
            await conn.close()
        self._set_state(CLOSED)
        self._up_event.clear()
