"""The spans of one message's way through a node, wrapped around the one data path.

The node calls these hooks whether tracing is on or off; off, each returns a shared
do-nothing context (one attribute check and no span per frame). On, every hop is a
span (mesh/tracing.py): the root span of each node carries the hop's identity
(transport, peer, app, channel, op); children carry only what is theirs, because every
attribute is paid for at 100% sampling, on the hot path and again when encoding.

    prscd.receive (SERVER) ... bus ... stream_function.receive (CONSUMER)

The rules' work and the publish are not spans of their own: the count of peers reached
(``prscd.delivered``) goes on the hop's span, whose context travels in the bus headers.
The subject is not repeated there: it follows from the span's app and channel and the
node (Resource), and each other node's ``stream_function.receive`` carries it. Five
spans per cross-node message became two; spans are most of what tracing every message
costs (docs/tracing.md). A publish with no traced hop around it (an offline the node
sends for a peer, backend data) is a root ``source.publish`` (PRODUCER) span.

What is traced: every presence change (joins, leaves, states, offlines, node down) and a
share of ``data`` messages (cursor moves), ``TRACE_DATA_RATIO`` (default 1%). The choice
is made here, before any span exists, because an unsampled OpenTelemetry span still
costs its context switches on the hot path. An unsampled message crosses the bus without
trace headers; a node receiving a ``data`` event without them samples it at its own ratio.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from opentelemetry.trace import INVALID_SPAN, Span, get_current_span

from mesh.bridge import TAG_PEER, MeshEvent, event_subject
from mesh.tracing import CONSUMER, PRODUCER, ROOT, SERVER, Tracing
from node.presence import Action, Deliver, Peer, Publish
from node.protocol import DATA, Signalling

_OFF: AbstractContextManager[Span] = contextlib.nullcontext(INVALID_SPAN)
_NO_HEADERS: AbstractContextManager[dict[str, str] | None] = contextlib.nullcontext(None)
#: Channels named on a disconnect span; past that only the count grows (a peer may be in
#: MAX_CHANNELS_PER_PEER channels, and every attribute is paid for when encoding).
SPAN_CHANNELS = 16


def delivered(actions: list[Action]) -> int:
    """Peers the actions deliver to (a span attribute)."""
    return sum(len(a.peers) for a in actions if isinstance(a, Deliver))


def published_channels(actions: list[Action]) -> tuple[tuple[str, ...], int]:
    """The first SPAN_CHANNELS channels the actions publish to, in order, and how many
    there are in all (span attributes)."""
    channels = list(dict.fromkeys(a.sig.c for a in actions if isinstance(a, Publish)))
    return tuple(channels[:SPAN_CHANNELS]), len(channels)


class Hops:
    def __init__(self, tracing: Tracing, *, bus_kind: str, mesh_id: str, node_id: str,
                 data_ratio: float = 1.0) -> None:
        self.tracing = tracing
        self.on = tracing.enabled
        self.bus_kind, self.mesh_id, self.node_id = bus_kind, mesh_id, node_id
        self.data_ratio = data_ratio

    def _skip(self, sig: Signalling) -> bool:
        """A ``data`` message this node does not trace (presence changes always are)."""
        return sig.t == DATA and (self.data_ratio <= 0.0 or random.random() >= self.data_ratio)

    def receive(self, peer: Peer, sig: Signalling, size: int) -> AbstractContextManager[Span]:
        """A frame from a local peer: the root of its trace."""
        if not self.on or self._skip(sig):
            return _OFF
        return self.tracing.span("prscd.receive", SERVER, {
            "prscd.transport": peer.transport, "prscd.peer.id": peer.client_id,
            "prscd.app": peer.app, "prscd.channel": sig.c, "prscd.op": sig.op or sig.t,
            "prscd.bytes": size}, parent=ROOT)

    def handle(self, rules: Callable[[Peer, Signalling], list[Action]], peer: Peer,
               sig: Signalling) -> list[Action]:
        """``rules(peer, sig)`` (presence.handle); the peers reached go on the hop's span."""
        if not self.on:
            return rules(peer, sig)
        actions = rules(peer, sig)
        span = get_current_span()
        if span.is_recording():
            span.set_attribute("prscd.delivered", delivered(actions))
        return actions

    def publish(self, sig: Signalling) -> AbstractContextManager[dict[str, str] | None]:
        """Around a Source publish; gives the bus headers that carry the trace."""
        if not self.on:
            return _NO_HEADERS
        span = get_current_span()
        if span.is_recording():
            return contextlib.nullcontext(self.tracing.inject(span))
        if sig.t == DATA:
            return _NO_HEADERS
        return self._publish(sig)

    def _subject(self, sig: Signalling) -> str:
        return event_subject(sig.app or "", sig.c, TAG_PEER, self.mesh_id, self.node_id)

    @contextlib.contextmanager
    def _publish(self, sig: Signalling) -> Iterator[dict[str, str]]:
        with self.tracing.span("source.publish", PRODUCER, {
                "messaging.system": self.bus_kind, "messaging.operation": "publish",
                "messaging.destination.name": self._subject(sig)}):
            yield self.tracing.inject()

    def dispatch(self, event: MeshEvent) -> AbstractContextManager[Span]:
        """An event from another node; yields the dispatch span (set its count)."""
        if not self.on or (not event.message.headers and self._skip(event.sig)):
            return _OFF
        sig = event.sig
        return self.tracing.span("stream_function.receive", CONSUMER, {
            "messaging.system": self.bus_kind, "messaging.operation": "receive",
            "messaging.destination.name": event.message.subject,
            "prscd.origin.mesh_id": sig.mesh or "", "prscd.origin.node_id": event.node,
            "prscd.tag": event.tag, "prscd.app": sig.app or "", "prscd.channel": sig.c,
            "prscd.op": sig.op or sig.t, "prscd.peer.id": sig.p or ""},
            parent=self.tracing.extract(event.message.headers))

    def disconnect(self, peer: Peer, actions: list[Action]) -> AbstractContextManager[Span]:
        """Around a peer's offline ``actions``: one publish per channel, each under this
        span's context, so the span names them all (bounded): ``prscd.channels`` and
        ``prscd.channel_count``; a subject follows from app, channel and node."""
        if not self.on:
            return _OFF
        channels, count = published_channels(actions)
        return self.tracing.span("prscd.disconnect", SERVER, {
            "prscd.transport": peer.transport, "prscd.peer.id": peer.client_id,
            "prscd.app": peer.app, "prscd.channels": channels, "prscd.channel_count": count})

    def node_down(self, node: str, why: str) -> AbstractContextManager[Span]:
        if not self.on:
            return _OFF
        return self.tracing.span("liveness.node_down", attributes={
            "prscd.dead_node_id": node, "prscd.reason": why})
