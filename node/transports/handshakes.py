"""Connections before they are peers: counted, bounded, and shed at the open-files limit.

A TCP connection costs a socket and ~46 KiB before TLS, ~29 KiB after TLS before its
request; a QUIC connection without a session ~70 KiB. They were not counted anywhere: a
client could hold thousands (issue 15). Here each listener's connections in their handshake
(TCP once TLS is done, see :class:`Handshakes`) are counted toward ``MAX_CONNECTIONS``
(through :meth:`node.ports.Peers.handshaking`), have
their own bound (``MAX_HANDSHAKES``: past it the oldest is closed) and
the handshake timeout. At the open-files limit, asyncio's accept loop logs a traceback every
second until descriptors come back: :class:`AcceptErrors` counts those failures, logs one
line per interval, and sheds the oldest handshakes so that /health and peers get sockets.
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


class Handshakes:
    """One listener's connections in their handshake, oldest first.

    A TCP connection is counted once TLS is done (at once without TLS): asyncio drops one
    whose TLS handshake fails without a word to its protocol object, which is then freed
    only by the cyclic garbage collector, seconds later; counting those would let a client
    that connects and leaves fill MAX_CONNECTIONS with ghosts. Before TLS a connection is
    bounded by the handshake timeout and, at the open-files limit, by :class:`AcceptErrors`.
    Entries are held by weak reference (and expire after the timeout) as a backstop.
    """

    def __init__(self, peers: Peers, transport: str, limit: int, timeout: float) -> None:
        self.peers = peers
        self.transport = transport
        self.limit = limit
        self.timeout = timeout
        #: id(connection) -> [weak reference, how to close it now (None until it has a
        #: transport)], oldest first.
        self.pending: dict[int, list[Any]] = {}

    def __len__(self) -> int:
        return len(self.pending)

    def began(self, conn: Any) -> None:
        key, ref = id(conn), weakref.ref(conn)
        self.pending[key] = [ref, None]
        self.peers.handshaking(self.transport, 1)
        weakref.finalize(conn, self._forget, key, ref)
        asyncio.get_running_loop().call_later(self.timeout + 1.0, self._forget, key, ref)

    def closable(self, conn: Any, close: Callable[[], None]) -> None:
        """``conn`` can now be closed by ``close``. Over the bound the oldest handshake is
        closed (counted as ``handshake_limit``), not the newest: a client holding
        connections open without a request must not keep /health or a real peer out."""
        entry = self.pending.get(id(conn))
        if entry is None:
            return
        entry[1] = close
        if self.limit and len(self.pending) > self.limit:
            for key, (ref, oldest) in list(self.pending.items()):
                if oldest is not None and key != id(conn):
                    self._forget(key, ref)
                    oldest()
                    self.peers.count_drop("handshake_limit")
                    break

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
        for key, (ref, close) in list(self.pending.items()):
            if shed >= n:
                break
            if close is not None:
                self._forget(key, ref)
                close()
                shed += 1
        if shed:
            self.peers.count_drop("handshake_shed", shed)
        return shed


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
