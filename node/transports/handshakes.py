"""Connections before they are peers: counted, bounded, and shed at the open-files limit.

A TCP connection costs a socket and ~46 KiB before TLS, ~29 KiB after TLS before its
request; a QUIC connection without a session ~70 KiB. They were not counted anywhere: a
client could hold thousands (issue 15). Here each listener's half-open connections (TCP
from its accept, TLS included; QUIC until it has a session) are counted toward
``MAX_CONNECTIONS`` (through :meth:`node.ports.Peers.handshaking`), have their own bound
(``MAX_HANDSHAKES``) and the handshake timeout. Past either bound the *oldest* half-open
connection of the node is closed, not the newcomer: a real client finishes its handshake in
milliseconds, so the oldest is almost always one that never meant to, and refusing
newcomers would let a few idle sockets lock everyone out (and /health with them). A node
whose ``MAX_CONNECTIONS`` are all peers still lets :data:`FULL_NODE_RESERVE` half-open
connections in, so that it answers /health and 503. At the open-files limit, asyncio's
accept loop logs a traceback every second until descriptors come back:
:class:`AcceptErrors` counts those failures, logs one line per interval, and sheds the
oldest handshakes so that /health and peers get sockets.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.ports import Peers

log = logging.getLogger("prscd.handshakes")

#: Accept errors that mean "out of descriptors or memory": asyncio retries after 1 s.
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


#: Every node's listeners' :class:`Handshakes` (the oldest half-open connection is looked
#: for across transports: a flood of QUIC connections must not keep a TCP peer out).
_NODE_WIDE: weakref.WeakKeyDictionary[Any, weakref.WeakSet[Handshakes]] = (
    weakref.WeakKeyDictionary())


#: Half-open connections let in beside a node whose MAX_CONNECTIONS are all peers: a full
#: node still answers /health, and 503 to a real client (whose browser sees the same error
#: as a refused TCP connection, but the operator's tools see why).
FULL_NODE_RESERVE = 16


class Handshakes:
    """One listener's half-open connections, oldest first.

    ``began`` at the accept (TCP: before TLS, which the WebSocket listener makes itself so
    that every ending is seen, node/transports/websocket.py), ``closable`` once it can be
    closed (this applies the bounds), ``ended`` when it is a peer or gone. Entries are held
    by weak reference and expire after ``expire`` seconds as a backstop.
    """

    def __init__(self, peers: Peers, transport: str, limit: int, timeout: float,
                 max_connections: int = 0, expire: float = 0.0) -> None:
        self.peers = peers
        self.transport = transport
        self.limit = limit
        self.timeout = timeout
        self.max_connections = max_connections
        #: TLS then the request, each within the timeout (QUIC passes its own).
        self.expire = expire or 2 * timeout + 1.0
        #: id(connection) -> [weak reference, how to close it now (None until it has a
        #: transport), when it began], oldest first.
        self.pending: dict[int, list[Any]] = {}
        self.node_wide = _NODE_WIDE.setdefault(peers, weakref.WeakSet())
        self.node_wide.add(self)

    def __len__(self) -> int:
        return len(self.pending)

    def began(self, conn: Any) -> None:
        key, ref = id(conn), weakref.ref(conn)
        loop = asyncio.get_running_loop()
        self.pending[key] = [ref, None, loop.time()]
        self.peers.handshaking(self.transport, 1)
        weakref.finalize(conn, self._forget, key, ref)
        loop.call_later(self.expire, self._forget, key, ref)

    def closable(self, conn: Any, close: Callable[[], None]) -> None:
        """``conn`` can now be closed by ``close``. Over ``MAX_HANDSHAKES``, or with the
        node's half-open connections past what ``MAX_CONNECTIONS`` leaves beside its peers
        (at least :data:`FULL_NODE_RESERVE`), the oldest half-open connection is closed
        (``handshake_limit``), never the newest."""
        entry = self.pending.get(id(conn))
        if entry is None:
            return
        entry[1] = close
        if self.limit and len(self.pending) > self.limit:
            self._close_oldest([self], conn)
        if self.max_connections:
            total = self.peers.connections()
            half_open = sum(len(h.pending) for h in self.node_wide)
            room = max(self.max_connections - (total - half_open), FULL_NODE_RESERVE)
            if half_open > room:
                self._close_oldest(list(self.node_wide), conn)

    def _close_oldest(self, among: list[Handshakes], conn: Any) -> bool:
        oldest: tuple[float, Handshakes, int] | None = None
        for handshakes in among:
            for key, (_, close, born) in handshakes.pending.items():
                if close is not None and key != id(conn):
                    if oldest is None or born < oldest[0]:
                        oldest = (born, handshakes, key)
                    break  # (each listener's entries are in order)
        if oldest is None:
            return False
        _, handshakes, key = oldest
        ref, close, _ = handshakes.pending[key]
        handshakes._forget(key, ref)
        close()
        self.peers.count_drop("handshake_limit")
        return True

    def ended(self, conn: Any) -> None:
        """Idempotent: a peer now, closed, or timed out."""
        entry = self.pending.get(id(conn))
        if entry is not None:
            self._forget(id(conn), entry[0])

    def _forget(self, key: int, ref: weakref.ref[Any]) -> None:
        entry = self.pending.get(key)
        if entry is not None and entry[0] is ref:  # (not a later object with the same id)
            del self.pending[key]
            self.peers.handshaking(self.transport, -1)

    def shed(self, n: int) -> int:
        """Close up to ``n`` of the oldest closable handshakes; how many were."""
        shed = 0
        for key, (ref, close, _) in list(self.pending.items()):
            if shed >= n:
                break
            if close is not None:
                self._forget(key, ref)
                close()
                shed += 1
        if shed:
            self.peers.count_drop("handshake_shed", shed)
        return shed


def tls_protocol(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's own TLS protocol class (uvloop's is in C; asyncio's in Python), the one
    ``create_server(ssl=...)`` would put under a connection."""
    if type(loop).__module__.startswith("uvloop"):
        from uvloop.loop import SSLProtocol as UvSSLProtocol

        return UvSSLProtocol
    from asyncio.sslproto import SSLProtocol

    return SSLProtocol


class AcceptErrors:
    """The event loop's exception handler for accept failures on ``sockets``; anything
    else goes to the handler that was there before."""

    def __init__(self, peers: Peers, handshakes: Handshakes, interval: float = 10.0) -> None:
        self.peers = peers
        self.handshakes = handshakes
        self.interval = interval
        self.failures = 0
        self._fds: set[int] = set()
        self._logged_at = -interval
        self._since_logged = 0
        self._previous: Any = None

    def install(self, sockets: Iterable[Any]) -> None:
        loop = asyncio.get_running_loop()
        self._fds = {s.fileno() for s in sockets}
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self._handle)

    def uninstall(self) -> None:
        self._fds = set()  # (another listener may have chained after us: pass through)

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        sock = context.get("socket")
        if (isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRORS and sock is not None
                and sock.fileno() in self._fds):
            self.failed(exc)
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def failed(self, exc: OSError) -> None:
        """One failed accept (asyncio tries again in a second): counted; the oldest quarter
        of the handshakes shed; one line per interval, no traceback."""
        self.failures += 1
        self.peers.count_drop("accept_failed")
        shed = self.handshakes.shed(max(1, len(self.handshakes) // 4))
        now = time.monotonic()
        self._since_logged += 1
        if now - self._logged_at >= self.interval:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.warning("cannot accept connections: %s (open files limit %d, %d connections in "
                        "their handshake, %d shed now); %d failed accepts since the last line; "
                        "asyncio retries every second", exc.strerror or exc, soft,
                        len(self.handshakes), shed, self._since_logged)
            self._logged_at, self._since_logged = now, 0


#: Descriptors kept free for what is not a connection: /health and /metrics each on a new
#: connection, the bus, the auth webhook, files.
FD_RESERVE = 64


def fit_open_files(max_connections: int, max_handshakes: int) -> tuple[int, int, str]:
    """Make room for the connection limits under the open-files limit, at start-up.

    The soft limit is raised to the hard one. If ``MAX_CONNECTIONS`` + ``MAX_HANDSHAKES``
    (0 = unlimited) still do not fit beside what is open now and FD_RESERVE, both are
    lowered to fit (a quarter for handshakes): the node then answers 503 or closes a
    handshake before accept() can fail. Returns the limits and a warning ("" if unchanged).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return max_connections, max_handshakes, ""
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 32
    budget = max(2, soft - in_use - FD_RESERVE)
    wanted = (max_connections or budget + 1) + (max_handshakes or budget + 1)
    if wanted <= budget:
        return max_connections, max_handshakes, ""
    handshakes = max(1, min(max_handshakes or budget, budget // 4))
    connections = max(1, budget - handshakes)
    if max_connections:
        connections = min(connections, max_connections)
    return connections, handshakes, (
        f"open files limit {soft} (hard {hard}): MAX_CONNECTIONS lowered to {connections} and "
        f"MAX_HANDSHAKES to {handshakes} to keep {FD_RESERVE} descriptors free (raise the "
        f"limit, e.g. ulimit -n, to serve more)")
