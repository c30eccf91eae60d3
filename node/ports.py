"""The narrow interfaces between the node and its adapters.

* :class:`Peers`: what a listener (a transport) may call on the node;
* :class:`Link`: what the node may call on one peer's connection;
* :class:`Status`: what the HTTP endpoints read.

Transports and endpoints import this module, never :mod:`node.server`; the
composition root (:mod:`node.app`) hands them the node. A frame's way reads
transport -> Peers.receive -> rules -> actions -> Link.send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from node.admin import AdminView
    from node.presence import Peer
    from node.protocol import Fault
    from node.tls import CertInfo


@dataclass(frozen=True, slots=True)
class Admission:
    """The verdict on a connection URL: 101 with an identity, or an HTTP error."""

    status: int
    reason: str = ""
    client_id: str = ""
    app: str = ""
    #: The channels the peer may join (a token's ``channels`` claim); None = any.
    channels: tuple[str, ...] | None = None


class Link(Protocol):
    """One peer's connection, as the node sees it. Neither method blocks."""

    def send(self, frame: bytes) -> bool:
        """Queue one message; False when it was not (the link is closing or closed)."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Close with a code of :class:`node.protocol.Fault` (or 1001): what is queued
        goes out first; a peer that never reads is cut off after a grace period."""
        ...


class Peers(Protocol):
    """What a transport calls on the node, in this order for one connection:
    ``admit`` (may this URL connect?), ``open``, ``receive`` per frame (in arrival
    order, one at a time), and ``closed`` once, when the connection is gone.
    ``fault`` and ``backlog`` report what the transport saw; the node decides."""

    async def admit(self, query: str, transport: str) -> Admission: ...

    def open(self, admission: Admission, transport: str, link: Link) -> Peer: ...

    async def receive(self, peer: Peer, frame: bytes) -> None:
        """Handle one frame. Bad input closes the peer (through its link); never raises."""
        ...

    def fault(self, peer: Peer, fault: Fault, reason: str) -> None:
        """The transport saw ``fault`` (a text frame, a ping timeout, a stream that does
        not parse): the peer is closed with the fault's code and goes offline at once."""
        ...

    def backlog(self, peer: Peer, queued: int) -> None:
        """``queued`` bytes wait in the transport for this peer (reported when non-zero)."""
        ...

    async def closed(self, peer: Peer, why: str, *, vanished: bool = False,
                     code: int | None = None) -> None:
        """The connection is gone; the peer's channels hear its ``peer_offline`` (after
        PRESENCE_GRACE if it ``vanished``: an idle timeout, no close and no FIN).
        ``code``: the close code sent or received (None: none), counted by /metrics;
        ``why`` is only logged.
        Idempotent: a peer the node closed already is not closed twice."""
        ...

    def count_drop(self, reason: str, n: int = 1) -> None: ...

    def count_http(self, status: int) -> None:
        """An HTTP answer went out on the node's port (/metrics counts them by status)."""
        ...

    def handshaking(self, transport: str, delta: int) -> None:
        """Connections of ``transport`` still in their handshake (TCP before TLS or before
        the request, QUIC without a session) changed by ``delta``: they count toward
        MAX_CONNECTIONS."""
        ...

    def connections(self) -> int:
        """Peers and connections in their handshake, every transport: what
        MAX_CONNECTIONS bounds."""
        ...

    def ping_rtt(self, peer: Peer, seconds: float) -> None:
        """A keepalive round trip of ``peer`` (for the RTT histogram)."""
        ...

    def silent(self, peer: Peer) -> None:
        """Past the soft keepalive timeout (no pong, no packet) but still connected: the
        peer goes offline for the others after PRESENCE_GRACE (node/silence.py)."""
        ...

    def heard(self, peer: Peer) -> None:
        """A pong or a packet came from a silent peer: it is back (cheap when not silent)."""
        ...


class Status(Protocol):
    """What /health, /ready, /metrics, /cert-hash and /v1/nodes read."""

    @property
    def mesh_id(self) -> str: ...

    @property
    def cert(self) -> CertInfo | None: ...

    def health(self) -> dict[str, Any]: ...

    def readiness(self) -> tuple[bool, str]: ...

    def metrics_text(self) -> str: ...

    def directory(self) -> list[dict[str, Any]]: ...

    #: The operations page's data (node/admin.py); None before node/app.py sets it.
    admin: AdminView | None
