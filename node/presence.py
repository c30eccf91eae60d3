"""Realms, channels and peers: the presence rules (no I/O).

A *realm* is one app's namespace (apps never see each other). A *channel* lives in
a realm and holds the local peers that joined it, plus the remote members other
nodes told us about (so their offline events can be synthesised when a node dies).
A *peer* is one connection: two tabs with the same client id are two peers.

The rules take a message and return what must happen, as small action objects; the
node carries them out. Nothing here reads a clock, a socket or the environment, and
no peer holds a transport handle: the node keeps the sid -> link map.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from node import protocol
from node.protocol import Fault, Signalling


@dataclass(eq=False, slots=True)
class Peer:
    """One connection (``transport`` names its kind: "websocket" or "webtransport")."""

    sid: str
    client_id: str
    app: str
    transport: str
    channels: set[str] = field(default_factory=set)
    rtt_ms: float | None = None
    #: The channels this peer may join (a token's ``channels`` claim); None = any. Named
    #: apart from ``channels``, the ones it is in. Checked by node/limits.py.
    allowed_channels: tuple[str, ...] | None = None
    #: channel -> the ``pl`` of this peer's last ``peer_state`` (or its join) there, and
    #: when (Presence's counter, not a clock): the server API shows the latest per id.
    states: dict[str, bytes] = field(default_factory=dict)
    state_seq: dict[str, int] = field(default_factory=dict)
    #: Silent: no pong or packet for the soft keepalive timeout, its connection still open
    #: (see :meth:`Presence.silence`). ``released``: channel -> its last ``pl`` there, for
    #: each channel whose grace period ended while it was silent (it re-joins them if heard).
    silent: bool = False
    released: dict[str, bytes | None] | None = None


@dataclass(frozen=True, slots=True)
class Deliver:
    """Send ``frame`` (already encoded, once) to each of ``peers``."""

    peers: tuple[Peer, ...]
    frame: bytes


@dataclass(frozen=True, slots=True)
class Publish:
    """Hand ``sig`` (with ``p``, ``sid`` and ``app`` set) to the mesh Source."""

    sig: Signalling


@dataclass(frozen=True, slots=True)
class Interest:
    """This node gained (``active``) or lost its last local peer in a channel."""

    app: str
    channel: str
    active: bool


@dataclass(frozen=True, slots=True)
class Close:
    """Close ``peer`` with ``fault``'s code and ``reason``; it goes offline for everyone
    at once, whatever its transport still has to flush."""

    peer: Peer
    fault: Fault
    reason: str


@dataclass(frozen=True, slots=True)
class Member:
    """A client id got its first connection in a channel on this node (``joined``), or its
    last one there went. Other tabs of the same id, or the id on another node, make no
    transition: this is per node, for membership webhooks (node/webhooks.py)."""

    app: str
    channel: str
    client_id: str
    joined: bool
    #: The member's connection vanished and the grace period ran out (or it came back on
    #: another node): it has been held already, the webhooks do not hold it again.
    after_grace: bool = False


@dataclass(frozen=True, slots=True)
class Hold:
    """``peer`` vanished (no close, no FIN: a keepalive or idle timeout): its channels keep
    it for the grace period. The node calls :meth:`Presence.release` for each channel
    when the period ends; a :class:`Returned` first means it never left there."""

    peer: Peer


@dataclass(frozen=True, slots=True)
class Returned:
    """Held ``peer``'s client id came back in ``channel`` (here or on another node) within
    the grace period: nobody is told it went; its release there is cancelled."""

    peer: Peer
    channel: str


Action = Deliver | Publish | Interest | Close | Member | Hold | Returned


#: Who sent a ``peer_state``: a local sid, or (node id, sid) for a member on another node.
StateKey = str | tuple[str, str]


@dataclass(slots=True)
class Channel:
    name: str
    peers: dict[str, Peer] = field(default_factory=dict)
    #: (node id, sid) -> client id of members on other nodes, learned from the mesh.
    remote: dict[tuple[str, str], str] = field(default_factory=dict)
    #: peer_state dedupe: the last ``pl`` each member forwarded, and the local sids still
    #: waiting for it (they joined or re-announced since). Empty sets in steady state.
    last_state: dict[StateKey, bytes] = field(default_factory=dict)
    waiting: dict[StateKey, set[str]] = field(default_factory=dict)
    #: sid -> local peers that vanished, kept through the grace period (see Hold): still
    #: members for everyone, but nothing is delivered to them.
    held: dict[str, Peer] = field(default_factory=dict)


@dataclass(slots=True)
class Realm:
    app: str
    channels: dict[str, Channel] = field(default_factory=dict)


class Presence:
    """All realms of one node. Call it from one thread (the event loop).

    With ``dedupe_state``, a ``peer_state`` whose ``pl`` is the same as the one its
    sender forwarded last goes only to the members that have not seen it since they
    joined or sent ``peer_online``, instead of to the whole channel. The real client
    answers every ``peer_online`` with its (unchanged) state to the whole channel, so
    a channel of N peers joining at once costs N^3/2 deliveries without this and about
    2N^2 with it; every member still ends up with every other member's latest state:

    * a changed state goes to everyone;
    * ``peer_online`` from X makes every client reset X to ``{id}``, so X's next state
      goes to everyone; and X itself (re-joining, or asked to resync) waits for
      everybody's state again, as does a peer that joins;
    * leaving, disconnecting, a remote offline or a dead node forget the sender.
    """

    def __init__(self, mesh_id: str, *, dedupe_state: bool = False) -> None:
        self.mesh_id = mesh_id
        self.dedupe_state = dedupe_state
        self.realms: dict[str, Realm] = {}
        self.peers: dict[str, Peer] = {}
        #: Why frames were dropped, by reason. Adapters add their own reasons.
        self.dropped: Counter[str] = Counter()
        self.handled = 0
        self._state_seq = 0

    # -- local peers ---------------------------------------------------------

    def connect(self, peer: Peer) -> None:
        self.peers[peer.sid] = peer

    def handle(self, peer: Peer, sig: Signalling) -> list[Action]:
        """Apply one decoded frame from a local peer, in arrival order."""
        self.handled += 1
        if sig.op == protocol.CHANNEL_JOIN:
            self._keep_state(peer, sig.c, sig.pl)
            return self._join(peer, sig.c)
        if sig.c not in peer.channels:
            self.dropped["not_joined"] += 1
            return []
        if sig.op == protocol.PEER_STATE:
            self._keep_state(peer, sig.c, sig.pl)
        back: list[Action] | None = None  # (no list per frame on the hot path)
        if sig.op == protocol.PEER_ONLINE:
            channel = self.realms[peer.app].channels[sig.c]
            if channel.held:  # its id back: after its online (see _returned)
                back = self._returned(channel, peer.app, peer.client_id, here=True)
        if self.dedupe_state and sig.op is not None:
            channel = self.realms[peer.app].channels[sig.c]
            if sig.op == protocol.PEER_ONLINE:
                _forget_sender(channel, peer.sid)
                _wants_states(channel, peer.sid)
            elif sig.op == protocol.PEER_STATE:
                assert sig.pl is not None  # protocol.decode guarantees it
                return self._forward(peer, sig, _state_targets(channel, peer.sid, sig.pl))
        if sig.op == protocol.PEER_OFFLINE:
            return self._offline(peer, sig.c)
        actions = self._forward(peer, sig)
        if back:
            actions += back
        return actions

    def disconnect(self, peer: Peer) -> list[Action]:
        """The connection is gone: every channel it joined hears ``peer_offline``."""
        actions: list[Action] = []
        for name in sorted(peer.channels):
            actions.extend(self._offline(peer, name))
        self.peers.pop(peer.sid, None)
        return actions

    def hold(self, peer: Peer) -> list[Action]:
        """The connection vanished: its channels keep the peer (held) until
        :meth:`release`, or until its client id comes back there (:class:`Returned`)."""
        self.peers.pop(peer.sid, None)
        if not peer.channels:
            return []
        for name in peer.channels:
            channel = self.realms[peer.app].channels[name]
            channel.peers.pop(peer.sid, None)
            channel.held[peer.sid] = peer
            for waiting in channel.waiting.values():
                waiting.discard(peer.sid)
        return [Hold(peer)]

    def release(self, peer: Peer, name: str) -> list[Action]:
        """The grace period of held ``peer`` in channel ``name`` ended: it goes offline
        there now (nothing, if it came back meanwhile). A silent peer remembers the
        channel and its state there, to re-join if it is heard again."""
        realm = self.realms.get(peer.app)
        channel = realm.channels.get(name) if realm else None
        if channel is None or channel.held.pop(peer.sid, None) is None:
            return []
        if peer.silent:
            if peer.released is None:
                peer.released = {}
            peer.released[name] = peer.states.get(name)
        return self._offline(peer, name, after_grace=True)

    def silence(self, peer: Peer) -> list[Action]:
        """``peer``'s connection went silent (no pong, no packet for the soft timeout) but
        is still open: held in its channels like a vanished peer (:meth:`hold`), still a
        member for everyone, and still delivered to (a live peer whose answer was late
        misses nothing). :meth:`heard` undoes it; a close goes through :meth:`hold` or
        :meth:`disconnect` as for any peer."""
        if peer.silent:
            return []
        peer.silent = True
        realm = self.realms.get(peer.app)
        if realm is None or not peer.channels:
            return []
        for name in peer.channels:
            realm.channels[name].held[peer.sid] = peer
        return [Hold(peer)]

    def heard(self, peer: Peer) -> list[Action]:
        """A silent peer answered after all: where its grace period still runs, nothing
        happened (:class:`Returned`); where it ended (the others saw its offline), it joins
        again with its last state, and the others see ``peer_online`` and that state."""
        if not peer.silent:
            return []
        peer.silent = False
        actions: list[Action] = []
        realm = self.realms.get(peer.app)
        for name in sorted(peer.channels):
            channel = realm.channels.get(name) if realm else None
            if channel is not None and channel.held.pop(peer.sid, None) is not None:
                actions.append(Returned(peer, name))
        released, peer.released = peer.released, None
        for name, pl in sorted((released or {}).items()):
            actions.extend(self._rejoin(peer, name, pl))
        return actions

    def _rejoin(self, peer: Peer, name: str, pl: bytes | None) -> list[Action]:
        """What the client did when it joined, on its behalf (its page never knew it left):
        join without an ack, ``peer_online``, and its last ``peer_state``. The others answer
        the online with their states, so it catches up on what changed meanwhile."""
        self._keep_state(peer, name, pl)
        actions = self._join(peer, name, ack=False)
        actions.extend(self.handle(peer, Signalling(t=protocol.CONTROL,
                                                    op=protocol.PEER_ONLINE, c=name)))
        if pl is not None:
            actions.extend(self.handle(peer, Signalling(t=protocol.CONTROL,
                                                        op=protocol.PEER_STATE, c=name, pl=pl)))
        return actions

    def _returned(self, channel: Channel, app: str, client_id: str,
                  here: bool) -> list[Action]:
        """``client_id`` announced itself in ``channel`` (``here``: from a local peer):
        its held peers there never left. The mesh still drops their (node, sid): their
        offline is published after the new connection's online, so other nodes, which
        see the id present, tell nobody."""
        back = [p for p in channel.held.values() if p.client_id == client_id]
        actions: list[Action] = []
        for held in back:
            del channel.held[held.sid]
            channel.peers.pop(held.sid, None)  # (a silent one is still there)
            held.channels.discard(channel.name)
            _forget_sender(channel, held.sid)
            actions.append(Returned(held, channel.name))
            actions.append(Publish(Signalling(
                t=protocol.CONTROL, op=protocol.PEER_OFFLINE, c=channel.name, p=client_id,
                sid=held.sid, app=app, mesh=self.mesh_id)))
        if back and not here and not _id_local(channel, client_id):
            # Back on another node: this node's membership ends (per node, see Member).
            actions.append(Member(app, channel.name, client_id, False, after_grace=True))
        return actions

    def _offline(self, peer: Peer, name: str, *, after_grace: bool = False) -> list[Action]:
        """``peer`` leaves channel ``name``. Clients remove members *by id*: while another
        connection with the same id stays in the channel (a second tab, or the same client
        already back on another node), local peers are not told; the mesh always is."""
        offline = Signalling(t=protocol.CONTROL, op=protocol.PEER_OFFLINE, c=name)
        channel = self.realms[peer.app].channels[name]
        if _id_present(channel, peer.client_id, but=peer.sid):
            actions: list[Action] = [p for p in self._forward(peer, offline)
                                     if not isinstance(p, Deliver)]
            last_here = not _id_local(channel, peer.client_id, but=peer.sid)
        else:
            actions = self._forward(peer, offline)
            last_here = True
        if last_here:
            actions.append(Member(peer.app, name, peer.client_id, False, after_grace))
        actions.extend(self._remove(peer, name))
        return actions

    def _join(self, peer: Peer, name: str, *, ack: bool = True) -> list[Action]:
        actions: list[Action] = []
        realm = self.realms.get(peer.app)
        if realm is None:
            realm = self.realms[peer.app] = Realm(peer.app)
        channel = realm.channels.get(name)
        if channel is None:
            channel = realm.channels[name] = Channel(name)
            actions.append(Interest(peer.app, name, True))
        if peer.sid not in channel.peers and not _id_local(channel, peer.client_id):
            # (a held connection of this id counts as here: it never left, see Hold)
            actions.append(Member(peer.app, name, peer.client_id, True))
        channel.peers[peer.sid] = peer
        peer.channels.add(name)
        if self.dedupe_state:
            _wants_states(channel, peer.sid)  # a new Channel object on the client: empty
        # Re-joining is harmless: the client makes a new Channel object and waits
        # for an ack again.
        if ack:
            actions.append(Deliver((peer,), protocol.encode_join_ack(name, self.mesh_id)))
        return actions

    def _forward(self, peer: Peer, sig: Signalling,
                 only: set[str] | None = None) -> list[Action]:
        """Publish ``sig`` and deliver it to the channel's other local peers (or to
        those of them whose sid is in ``only``)."""
        channel = self.realms[peer.app].channels[sig.c]
        out = replace(sig, p=peer.client_id, sid=peer.sid, app=peer.app, mesh=self.mesh_id)
        actions: list[Action] = [Publish(out)]
        if only is not None:  # usually a few sids: look them up, do not scan the channel
            peers = channel.peers
            others = tuple(p for sid in only
                           if sid != peer.sid and (p := peers.get(sid)) is not None)
        else:
            # Everyone but the sender, copied at C speed (this runs once per message).
            members = tuple(channel.peers.values())
            try:
                i = members.index(peer)
            except ValueError:
                others = members
            else:
                others = members[:i] + members[i + 1:]
        if others:
            actions.insert(0, Deliver(others, protocol.encode(out)))
        return actions

    def _keep_state(self, peer: Peer, name: str, pl: bytes | None) -> None:
        if pl is None:
            peer.states.pop(name, None)
            peer.state_seq.pop(name, None)
            return
        self._state_seq += 1
        peer.states[name] = pl
        peer.state_seq[name] = self._state_seq

    def _remove(self, peer: Peer, name: str) -> list[Action]:
        peer.channels.discard(name)
        peer.states.pop(name, None)
        peer.state_seq.pop(name, None)
        realm = self.realms.get(peer.app)
        if realm is None or (channel := realm.channels.get(name)) is None:
            return []
        channel.peers.pop(peer.sid, None)
        channel.held.pop(peer.sid, None)  # a silent peer that left or closed cleanly
        if channel.last_state or channel.waiting:
            _forget_sender(channel, peer.sid)
            for waiting in channel.waiting.values():
                waiting.discard(peer.sid)
        return self._free_if_empty(realm, channel)

    def _free_if_empty(self, realm: Realm, channel: Channel) -> list[Action]:
        if channel.peers or channel.held:
            return []
        # No local peer left: we stop listening, so remote members go stale too.
        del realm.channels[channel.name]
        if not realm.channels:
            del self.realms[realm.app]
        return [Interest(realm.app, channel.name, False)]

    # -- the mesh ------------------------------------------------------------

    def dispatch_remote(self, sig: Signalling, node: str) -> list[Action]:
        """Deliver an event that came from another node (or a backend) to local peers."""
        realm = self.realms.get(sig.app or "")
        channel = realm.channels.get(sig.c) if realm else None
        if channel is None:
            self.dropped["no_local_channel"] += 1
            return []
        targets: set[str] | None = None
        if sig.sid is not None and sig.p is not None:
            key = (node, sig.sid)
            if sig.op == protocol.PEER_OFFLINE:
                channel.remote.pop(key, None)
                _forget_sender(channel, key)
                if _id_present(channel, sig.p):
                    return []  # another connection with that id is still here
            else:
                channel.remote[key] = sig.p
                if sig.op == protocol.PEER_ONLINE and channel.held:
                    back = self._returned(channel, sig.app or "", sig.p, here=False)
                    if back:
                        if self.dedupe_state:
                            _forget_sender(channel, key)
                        delivers: list[Action] = (
                            [Deliver(tuple(channel.peers.values()), protocol.encode(sig))]
                            if channel.peers else [])
                        assert realm is not None  # the channel was found in it
                        return delivers + back + self._free_if_empty(realm, channel)
                if self.dedupe_state and sig.op == protocol.PEER_ONLINE:
                    _forget_sender(channel, key)
                elif self.dedupe_state and sig.op == protocol.PEER_STATE and sig.pl is not None:
                    targets = _state_targets(channel, key, sig.pl)
        if not channel.peers:
            return []
        if targets is not None:
            members = channel.peers
            peers = tuple(p for sid in targets if (p := members.get(sid)) is not None)
            return [Deliver(peers, protocol.encode(sig))] if peers else []
        return [Deliver(tuple(channel.peers.values()), protocol.encode(sig))]

    def node_down(self, node: str) -> list[Action]:
        """A node vanished: its members go offline for our local peers."""
        actions: list[Action] = []
        for realm in self.realms.values():
            for channel in realm.channels.values():
                gone = [key for key in channel.remote if key[0] == node]
                if not gone:
                    continue
                ids = [channel.remote.pop(key) for key in gone]
                # An id still in the channel (reconnected elsewhere before this node was
                # declared dead) must not be removed from clients' lists.
                staying = {p.client_id for p in channel.peers.values()}
                staying.update(channel.remote.values())
                for key, client_id in zip(gone, ids, strict=True):
                    _forget_sender(channel, key)
                    if client_id in staying:
                        continue
                    staying.add(client_id)  # one offline per id
                    offline = Signalling(
                        t=protocol.CONTROL, op=protocol.PEER_OFFLINE, c=channel.name, p=client_id
                    )
                    if channel.peers:
                        frame = protocol.encode(offline)
                        actions.append(Deliver(tuple(channel.peers.values()), frame))
        return actions

    # -- inspection ----------------------------------------------------------

    def channel_count(self) -> int:
        return sum(len(realm.channels) for realm in self.realms.values())

    # The server API's local answers (node/answers.py merges them across nodes).

    def channels(self, app: str) -> list[dict[str, Any]]:
        """``app``'s channels with local peers: name, and members (distinct ids here; a
        held peer is one: the others have not seen it go, see Hold)."""
        realm = self.realms.get(app)
        if realm is None:
            return []
        return [{"name": name, "members": len({p.client_id for p in channel.peers.values()}
                                              | {p.client_id for p in channel.held.values()})}
                for name, channel in sorted(realm.channels.items())]

    def members(self, app: str, name: str) -> list[dict[str, Any]]:
        """Each client id with local peers in the channel, once: ``connections`` here and
        ``state``, the ``pl`` (msgpack) its connections sent last (None before any). A held
        peer (vanished, within PRESENCE_GRACE) is listed: the others still see it."""
        realm = self.realms.get(app)
        channel = realm.channels.get(name) if realm else None
        if channel is None:
            return []
        by_id: dict[str, list[Any]] = {}  # id -> [connections, seq, state]
        # (a silent peer is in both: its connection is still open, see silence)
        held = [p for sid, p in channel.held.items() if sid not in channel.peers]
        for p in [*channel.peers.values(), *held]:
            seq = p.state_seq.get(name, 0)
            entry = by_id.get(p.client_id)
            if entry is None:
                by_id[p.client_id] = [1, seq, p.states.get(name)]
                continue
            entry[0] += 1
            if seq > entry[1]:
                entry[1:] = [seq, p.states.get(name)]
        return [{"id": cid, "state": state, "connections": n}
                for cid, (n, _, state) in sorted(by_id.items())]

    def user(self, app: str, client_id: str) -> dict[str, Any]:
        """The channels ``client_id`` is in here, and its connections here (in a channel
        or not). Scans this node's connections: bounded by MAX_CONNECTIONS."""
        names: set[str] = set()
        connections = 0
        for p in self.peers.values():
            if p.client_id == client_id and p.app == app:
                connections += 1
                names |= p.channels
        return {"channels": sorted(names), "connections": connections}

    def snapshot(self) -> dict[str, Any]:
        """A plain-data view for dumps; no secrets (keys are not part of the state)."""
        return {
            app: {
                name: {
                    "peers": [
                        {
                            "sid": p.sid,
                            "id": p.client_id,
                            "transport": p.transport,
                            "rtt_ms": p.rtt_ms,
                        }
                        for p in channel.peers.values()
                    ],
                    "remote": len(channel.remote),
                }
                for name, channel in realm.channels.items()
            }
            for app, realm in self.realms.items()
        }


def _id_present(channel: Channel, client_id: str, but: str = "") -> bool:
    """Is a member with this client id (other than local sid ``but``) in the channel?
    A held peer is one (it may come back)."""
    return _id_local(channel, client_id, but) or client_id in channel.remote.values()


def _id_local(channel: Channel, client_id: str, but: str = "") -> bool:
    """Is a local peer with this client id (other than sid ``but``) in the channel, held
    ones included?"""
    return any(p.client_id == client_id and p.sid != but
               for peers in (channel.peers, channel.held) for p in peers.values())


# -- peer_state dedupe (see Presence) ----------------------------------------------------


def _state_targets(channel: Channel, sender: StateKey, pl: bytes) -> set[str] | None:
    """Local sids a ``peer_state`` must reach; None = everyone (the state changed)."""
    waiting = channel.waiting.pop(sender, None)
    if channel.last_state.get(sender) == pl:
        return waiting or set()
    channel.last_state[sender] = pl
    return None


def _forget_sender(channel: Channel, sender: StateKey) -> None:
    """Clients dropped (or reset) what they knew of ``sender``: its next state is news."""
    channel.last_state.pop(sender, None)
    channel.waiting.pop(sender, None)


def _wants_states(channel: Channel, sid: str) -> None:
    """Local peer ``sid`` lists nobody yet: it waits for every member's current state."""
    for sender in channel.last_state:
        if sender != sid:
            channel.waiting.setdefault(sender, set()).add(sid)


def local_peers(actions: Iterable[Action]) -> list[Peer]:
    """Every peer some action delivers to (for tests and tracing counts)."""
    return [p for a in actions if isinstance(a, Deliver) for p in a.peers]
