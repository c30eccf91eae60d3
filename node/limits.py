"""Limits on what one peer may cost a node (no I/O; the clock is passed in).

* **Message rate**: a token bucket per peer, ``RATE_LIMIT`` messages per second on
  average with bursts of ``RATE_BURST``. A message over the rate is dropped and counted
  (``rate_limited``). What is dropped also fills a second, leaky counter that drains at
  the rate: a peer that keeps sending more than twice its rate overflows it after a
  while and is closed with 1008 ``message rate over N/s`` (the client may reconnect).
* **Answers the server asked for** are not charged: the real client answers every
  ``peer_online`` it receives with a ``peer_state`` from each of its Channel objects, and
  every join ack with ``peer_online`` + ``peer_state`` per channel, so a join storm in a
  channel of N members makes each member send about N messages at once. Credit is kept
  per channel: a delivered ``peer_online`` credits the peer one ``peer_state`` in each
  channel it is in, a join ack one ``peer_online`` and one ``peer_state`` in each; a
  credit is spent only by that op in that channel (so it cannot be spent twice over
  across channels), before tokens, and is capped. A ``peer_online`` is never credited by
  another ``peer_online`` (only by an ack), so two peers cannot bounce them for free.
* **A join pays for what it asks**: its ack makes every channel of the connection
  announce itself, so a join costs one token per channel the peer is in after it (a
  re-join of a channel it is in already too: re-joining was a way to buy 2 x 64 credited
  messages for one token). It needs one token; the rest may leave the bucket in debt, at
  most ``RATE_BURST``, so joins that fit the rate are never refused half way.
* **Allowed channels**: a peer admitted with a list of channels (a token's ``channels``
  claim, or the auth webhook's answer) may join only those; any other join closes the
  connection with 4003 ``channel not allowed by the token: <name>``
  (:func:`channel_allowed`; the list is checked by :func:`parse_channels` at admission).
* **Channels per peer** and **peers per channel** (local peers of this node): a join over
  either is refused by closing the connection with 4008 and the reason. The real client
  waits for a join ack forever and has no error path; an ack that never comes leaves the
  page hanging silently, a close is seen (``presence.on('closed')``, the close event's
  reason) and, being >= 4000, is not retried in a loop by the client.
* **Connections** per node process: past ``MAX_CONNECTIONS`` the handshake answers 503.
* **Write backlog**: a peer with more than ``WRITE_BUFFER_LIMIT`` bytes queued towards it
  (its transport reports the backlog) is closed with 1008 rather than buffered for without
  bound; it goes offline for everyone at once.

Every close decided here is a :class:`~node.presence.Close` naming a
:class:`~node.protocol.Fault` (the close-code table).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from node import protocol
from node.presence import Close
from node.protocol import Fault

if TYPE_CHECKING:
    from node.config import Settings
    from node.presence import Peer, Presence
    from node.protocol import Signalling

OK: Final = 0
DROP: Final = 1
FLOOD: Final = 2

#: Most patterns in one list of allowed channels: matching a join walks the list, so its
#: length bounds the cost of every join (a token rides in the URL, HTTP_MAX_LINE bytes).
MAX_CHANNEL_PATTERNS: Final = 256


def parse_channels(claim: object) -> tuple[str, ...]:
    """A list of allowed channels, checked: strings naming a channel (at most
    ``MAX_CHANNEL_BYTES``), where ``*`` may only end a pattern (``team-7/*``; a lone ``*``
    is every channel). Raises ValueError with a short reason for anything else."""
    if not isinstance(claim, list):
        raise ValueError("channels is not a list")
    if len(claim) > MAX_CHANNEL_PATTERNS:
        raise ValueError(f"more than {MAX_CHANNEL_PATTERNS} channels")
    for pattern in claim:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("a channel is not a non-empty string")
        if len(pattern.encode()) > protocol.MAX_CHANNEL_BYTES:
            raise ValueError(f"a channel is longer than {protocol.MAX_CHANNEL_BYTES} bytes")
        if "*" in pattern[:-1]:
            raise ValueError("'*' may only end a channel pattern")
    return tuple(claim)


def channel_allowed(allowed: tuple[str, ...] | None, name: str) -> bool:
    """May a peer with these allowed channels (None = any) join ``name``? A pattern is a
    name, or a prefix followed by ``*``."""
    if allowed is None:
        return True
    for pattern in allowed:
        if pattern[-1] == "*":
            if name.startswith(pattern[:-1]):
                return True
        elif name == pattern:
            return True
    return False


class Bucket:
    """One peer's token bucket, its flood counter and its credit for asked-for answers.

    Credit costs O(1) per ask whatever the number of channels: ``asked_online`` and
    ``asked_state`` count the rounds of answers asked of every channel of the peer; per
    channel, ``spent`` holds how many of each it has used ([online, state], set to the
    current rounds when the channel is joined, so a new channel inherits no old credit).
    """

    __slots__ = ("asked_online", "asked_state", "at", "excess", "spent", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = float(burst)
        self.at = now
        self.excess = 0.0
        self.asked_online = 0
        self.asked_state = 0
        self.spent: dict[str, list[int]] = {}

    def credited(self, which: int, channel: str, cap: int) -> bool:
        """Spend one credit of kind ``which`` (0 online, 1 state) in ``channel``, if owed."""
        spent = self.spent.get(channel)
        if spent is None:
            return False
        asked = self.asked_state if which else self.asked_online
        if spent[which] >= asked:
            return False
        spent[which] = max(spent[which], asked - cap) + 1
        return True

    def take(self, rate: float, burst: float, now: float, cost: float = 1.0) -> int:
        """OK, DROP (over the rate) or FLOOD (over twice the rate for a while). A cost over
        one needs one token and may leave the bucket in debt, down to ``-burst``."""
        elapsed = now - self.at
        if elapsed > 0:
            self.at = now
            refill = elapsed * rate
            self.tokens = min(burst, self.tokens + refill)
            if self.excess:
                self.excess = max(0.0, self.excess - refill)
        if self.tokens >= 1.0:
            self.tokens = max(self.tokens - cost, -burst)
            return OK
        self.excess += cost  # a dropped join weighs what it would have cost
        return FLOOD if self.excess > burst else DROP


class Guard:
    """Every limit of one node. The node asks before it acts; nothing here sends."""

    def __init__(self, settings: Settings, presence: Presence) -> None:
        self.presence = presence
        self.rate = float(settings.rate_limit)
        self.burst = float(max(settings.rate_burst, 1))
        self.max_channels = settings.max_channels_per_peer
        self.max_members = settings.max_peers_per_channel
        self.max_connections = settings.max_connections
        self.write_buffer_limit = settings.write_buffer_limit
        #: At most this much credit is held per channel for answers (a join storm in a full
        #: channel).
        self.credit_cap = 4 * max(self.max_members, 64)
        self.buckets: dict[str, Bucket] = {}

    # -- connections -------------------------------------------------------------------

    def admit(self, handshakes: int = 0) -> str:
        """Why a new connection must be refused (HTTP 503), or ``""``. ``handshakes``:
        connections still in their handshake, this one included, to count too (the node
        passes none: it bounds them at their accept, node/transports/handshakes.py)."""
        if self.max_connections and (len(self.presence.peers) + max(handshakes - 1, 0)
                                     >= self.max_connections):
            return f"node full: {self.max_connections} connections"
        return ""

    def opened(self, peer: Peer, now: float) -> None:
        if self.rate:
            self.buckets[peer.sid] = Bucket(self.burst, now)

    def closed(self, peer: Peer) -> None:
        self.buckets.pop(peer.sid, None)

    # -- frames ------------------------------------------------------------------------

    def check(self, peer: Peer, sig: Signalling, now: float) -> Close | int:
        """OK, DROP (count and ignore), or a :class:`Close` of the connection."""
        op = sig.op
        bucket = self.buckets.get(peer.sid) if self.rate else None
        if bucket is not None:
            answer = (1 if op == protocol.PEER_STATE else 0 if op == protocol.PEER_ONLINE
                      else -1)
            if answer < 0 or not bucket.credited(answer, sig.c, self.credit_cap):
                # A join asks every channel of the connection to announce: one token each.
                cost = (len(peer.channels) + (sig.c not in peer.channels)
                        if op == protocol.CHANNEL_JOIN else 1)
                verdict = bucket.take(self.rate, self.burst, now, cost)
                if verdict == FLOOD:
                    return Close(peer, Fault.RATE_FLOOD, f"message rate over {self.rate:g}/s")
                if verdict == DROP:
                    return DROP
            if op == protocol.PEER_OFFLINE:
                bucket.spent.pop(sig.c, None)
        if op == protocol.CHANNEL_JOIN:
            if sig.c not in peer.channels:
                refused = self._check_join(peer, sig.c)
                if refused:
                    return refused
                if bucket is not None:  # no credit asked before it was joined
                    bucket.spent[sig.c] = [bucket.asked_online, bucket.asked_state]
            # The ack makes every Channel object of the connection announce itself.
            self.asked_announce(peer)
        elif sig.op == protocol.PEER_ONLINE and sig.c in peer.channels:
            self.online(peer.app, sig.c, peer)
        return OK

    def online(self, app: str | None, name: str, sender: Peer | None = None) -> None:
        """A ``peer_online`` goes to the local peers of a channel: each answers."""
        if not self.rate:
            return
        realm = self.presence.realms.get(app or "")
        channel = realm.channels.get(name) if realm is not None else None
        if channel is not None:
            self.asked_state([p for p in channel.peers.values() if p is not sender])

    def _check_join(self, peer: Peer, name: str) -> Close | int:
        if not channel_allowed(peer.allowed_channels, name):
            # A close, not a silent drop: the client waits for the ack forever otherwise.
            return Close(peer, Fault.CHANNEL_FORBIDDEN,
                         f"channel not allowed by the token: {name}")
        if self.max_channels and len(peer.channels) >= self.max_channels:
            return Close(peer, Fault.TOO_MANY_CHANNELS,
                         f"too many channels: at most {self.max_channels} per connection")
        if self.max_members:
            realm = self.presence.realms.get(peer.app)
            channel = realm.channels.get(name) if realm is not None else None
            if channel is not None and len(channel.peers) >= self.max_members:
                return Close(peer, Fault.CHANNEL_FULL, f"channel full: at most "
                             f"{self.max_members} peers per channel on this node")
        return OK

    def backlog(self, peer: Peer, queued: int) -> Close | None:
        """``queued`` bytes wait to be sent to ``peer`` (beyond what the kernel holds)."""
        if self.write_buffer_limit and queued > self.write_buffer_limit:
            return Close(peer, Fault.SLOW_READER, f"slow reader: {queued} bytes queued")
        return None

    def asked_state(self, peers: tuple[Peer, ...] | list[Peer]) -> None:
        """These peers were sent a ``peer_online``: each Channel object answers with a
        ``peer_state`` in its channel."""
        if not self.rate:
            return
        buckets = self.buckets
        for peer in peers:
            bucket = buckets.get(peer.sid)
            if bucket is not None:
                bucket.asked_state += 1

    def asked_announce(self, peer: Peer) -> None:
        """``peer`` is sent a join ack: each Channel object sends ``peer_online`` and
        ``peer_state`` in its channel."""
        bucket = self.buckets.get(peer.sid)
        if bucket is not None:
            bucket.asked_online += 1
            bucket.asked_state += 1
