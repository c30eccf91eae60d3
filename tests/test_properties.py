"""Property-based tests of the pure core: hostile bytes in, invariants kept."""

from __future__ import annotations

import contextlib
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from node import protocol
from node.presence import Deliver, Interest, Peer, Presence, Publish
from node.protocol import ProtocolError, Signalling

pytestmark = pytest.mark.unit

# -- the decoder -------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5) | st.integers(-1000, 1000) | st.binary(max_size=3), inner,
                      max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(["t", "op", "c", "p", "pl", "sid", "app", "mesh", "zz"])
values = st.sampled_from(["control", "data", "channel_join", "peer_online", "peer_state",
                          "peer_offline", "room", ""]) | msgpack_values
payloads = msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)) | st.binary(max_size=30)
maps = st.dictionaries(keys, values | payloads, max_size=6)


def client_readable(pl: bytes) -> None:
    """What @msgpack/msgpack in the browser needs to decode a forwarded pl."""
    body = msgpack.unpackb(pl, raw=False, strict_map_key=False)
    assert isinstance(body, dict)

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                assert isinstance(k, str | int) and not isinstance(k, bool)
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(body)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_protocol_error(frame: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        protocol.decode(frame)


@settings(max_examples=700, suppress_health_check=[HealthCheck.too_slow])
@given(maps)
def test_wrong_maps_only_raise_protocol_error_and_accepted_ones_are_safe(obj: dict) -> None:
    frame = msgpack.packb(obj, use_bin_type=True)
    try:
        sig = protocol.decode(frame)
    except ProtocolError as exc:
        assert str(exc)  # every refusal has a reason
        return
    assert sig.t in ("control", "data") and isinstance(sig.c, str) and sig.c
    assert sig.p is None and sig.sid is None and sig.app is None
    if sig.pl is not None:
        client_readable(sig.pl)
    if sig.t == "data":
        assert isinstance(msgpack.unpackb(sig.pl)["event"], str)
    out = msgpack.unpackb(protocol.encode(sig), raw=False)
    assert set(out) <= {"t", "op", "c", "p", "pl"}


# -- the presence rules as a state machine --------------------------------------------

APPS = ["app1", "app2"]
CHANNELS = ["a", "b", "c.d", ">"]
NODES = ["n1", "n2"]


def frames(actions: list) -> list[tuple[frozenset[str], dict]]:
    return [(frozenset(p.sid for p in a.peers), msgpack.unpackb(a.frame))
            for a in actions if isinstance(a, Deliver)]


class PresenceMachine(RuleBasedStateMachine):
    """The model: which peer is in which channel, checked against every action."""

    peers = Bundle("peers")

    def __init__(self) -> None:
        super().__init__()
        self.presence = Presence("eu")
        self.model: dict[str, tuple[str, set[str]]] = {}  # sid -> (app, channels)
        self.by_sid: dict[str, Peer] = {}
        self.next_sid = 0
        self.remote: dict[tuple[str, str, str], set[str]] = {}  # (app, channel, node) -> ids

    def members(self, app: str, channel: str) -> set[str]:
        return {sid for sid, (a, chs) in self.model.items() if a == app and channel in chs}

    def twin_stays(self, sid: str, others: set[str] | frozenset[str]) -> bool:
        return any(self.by_sid[o].client_id == self.by_sid[sid].client_id for o in others)

    @rule(target=peers, app=st.sampled_from(APPS), same_id=st.booleans())
    def connect(self, app: str, same_id: bool) -> str:
        self.next_sid += 1
        sid = str(self.next_sid)
        peer = Peer(sid=sid, client_id="twin" if same_id else f"u{sid}", app=app,
                    transport="test")
        self.presence.connect(peer)
        self.model[sid], self.by_sid[sid] = (app, set()), peer
        return sid

    @rule(sid=peers, channel=st.sampled_from(CHANNELS))
    def join(self, sid: str, channel: str) -> None:
        if sid not in self.model:
            return
        _app, chs = self.model[sid]
        actions = self.presence.handle(self.by_sid[sid], Signalling(
            t="control", op="channel_join", c=channel, pl=msgpack.packb({"id": "x"})))
        (only,) = frames(actions)
        assert only[0] == {sid} and only[1]["op"] == "channel_join"
        assert not any(isinstance(a, Publish) for a in actions)
        chs.add(channel)

    @rule(sid=peers, channel=st.sampled_from(CHANNELS),
          op=st.sampled_from(["peer_online", "peer_state", None]))
    def send(self, sid: str, channel: str, op: str | None) -> None:
        if sid not in self.model:
            return
        app, chs = self.model[sid]
        if op is None:
            sig = Signalling(t="data", c=channel, pl=msgpack.packb({"event": "e", "data": "1"}))
        else:
            sig = Signalling(t="control", op=op, c=channel,
                             pl=msgpack.packb({}) if op == "peer_state" else None)
        actions = self.presence.handle(self.by_sid[sid], sig)
        if channel not in chs:
            assert actions == []
            return
        others = self.members(app, channel) - {sid}
        delivered = frames(actions)
        if others:
            (only,) = delivered
            assert only[0] == others  # never the sender, never another app or channel
            assert only[1]["c"] == channel and only[1]["p"] == self.by_sid[sid].client_id
        else:
            assert delivered == []
        (pub,) = [a for a in actions if isinstance(a, Publish)]
        assert pub.sig.app == app and pub.sig.sid == sid

    @rule(sid=peers, channel=st.sampled_from(CHANNELS))
    def leave(self, sid: str, channel: str) -> None:
        if sid not in self.model:
            return
        app, chs = self.model[sid]
        actions = self.presence.handle(
            self.by_sid[sid], Signalling(t="control", op="peer_offline", c=channel))
        if channel not in chs:
            assert actions == []
            return
        others = self.members(app, channel) - {sid}
        offline = [f for f in frames(actions) if f[1]["op"] == "peer_offline"]
        told = others if not self.twin_stays(sid, others) else set()
        assert offline == ([(frozenset(told), offline[0][1])] if told else [])
        assert any(isinstance(a, Publish) for a in actions)  # the mesh is always told
        chs.discard(channel)
        if not others:
            assert Interest(app, channel, False) in actions

    @rule(sid=consumes(peers))
    def disconnect(self, sid: str) -> None:
        if sid not in self.model:
            return
        app, chs = self.model[sid]
        actions = self.presence.disconnect(self.by_sid[sid])
        got = frames(actions)
        # Exactly one offline per channel, to exactly the remaining members, unless a
        # connection with the same client id stays (clients remove members by id).
        expected = {ch: frozenset(self.members(app, ch) - {sid}) for ch in chs}
        expected = {ch: who for ch, who in expected.items() if not self.twin_stays(sid, who)}
        seen: dict[str, frozenset[str]] = {}
        for targets, frame in got:
            assert frame["op"] == "peer_offline" and frame["c"] not in seen
            seen[frame["c"]] = targets
        assert seen == {ch: who for ch, who in expected.items() if who}
        del self.model[sid]

    @rule(app=st.sampled_from(APPS), channel=st.sampled_from(CHANNELS),
          node=st.sampled_from(NODES), op=st.sampled_from(["peer_online", "peer_offline"]))
    def remote(self, app: str, channel: str, node: str, op: str) -> None:
        sig = Signalling(t="control", op=op, c=channel, p=f"{node}-peer", sid="r1", app=app,
                         mesh="us")
        actions = self.presence.dispatch_remote(sig, node)
        members = self.members(app, channel)
        assert {s for targets, _ in frames(actions) for s in targets} == members
        key = (app, channel, node)
        if members:
            if op == "peer_online":
                self.remote.setdefault(key, set()).add(f"{node}-peer")
            else:
                self.remote.pop(key, None)

    @rule(node=st.sampled_from(NODES))
    def node_down(self, node: str) -> None:
        actions = self.presence.node_down(node)
        for _targets, frame in frames(actions):
            assert frame["op"] == "peer_offline" and frame["p"] == f"{node}-peer"
        expected = {(app, ch) for (app, ch, n), ids in self.remote.items()
                    if n == node and ids and self.members(app, ch)}
        assert len(frames(actions)) == len(expected)
        for key in [k for k in self.remote if k[2] == node]:
            del self.remote[key]

    @invariant()
    def empty_channels_and_realms_are_freed(self) -> None:
        for app, realm in self.presence.realms.items():
            assert realm.channels, f"empty realm {app} kept"
            for name, channel in realm.channels.items():
                assert channel.peers, f"empty channel {name} kept"
                assert set(channel.peers) == self.members(app, name)
        # Remote members of a freed channel are forgotten with it.
        for key in list(self.remote):
            if not self.members(key[0], key[1]):
                del self.remote[key]


PresenceMachine.TestCase.settings = settings(max_examples=110, stateful_step_count=40,
                                             deadline=None)
test_presence_rules = PresenceMachine.TestCase


# -- several nodes on one bus ----------------------------------------------------------
#
# Three node slots share a bus that keeps each publisher's order (as NATS does) but may
# hold messages in flight for as long as the test likes. A node can crash (its peers
# vanish without a word, what it had in flight may be lost), be declared dead by the
# others (Presence.node_down, what liveness does after NODE_TIMEOUT) and restart with
# the same MESH_ID and a new node id.

SLOTS = 3
MESH_CHANNELS = ["a", "b"]


class Bus:
    """In-flight messages per (origin node id, destination slot), each queue in order."""

    def __init__(self) -> None:
        self.queues: dict[tuple[str, int], list[Signalling]] = {}

    def publish(self, origin: str, sig: Signalling, to: list[int]) -> None:
        for slot in to:
            self.queues.setdefault((origin, slot), []).append(sig)

    def busy(self) -> list[tuple[str, int]]:
        return sorted(k for k, q in self.queues.items() if q)

    def pending_to(self, slot: int) -> set[str]:
        return {origin for (origin, dest), q in self.queues.items() if dest == slot and q}

    def drop(self, *, origin: str | None = None, dest: int | None = None) -> None:
        for key in list(self.queues):
            if key[0] == origin or key[1] == dest:
                del self.queues[key]


class MeshMachine(RuleBasedStateMachine):
    """Presence rules on three nodes: delivery to the right local peers only, and no
    remote member that outlives its node, its connection or its channel."""

    DEDUPE = False

    def __init__(self) -> None:
        super().__init__()
        self.gen = [0] * SLOTS
        self.nodes: list[Presence | None] = [Presence(f"m{i}", dedupe_state=self.DEDUPE)
                                             for i in range(SLOTS)]
        self.ids = [f"m{i}-0" for i in range(SLOTS)]
        self.bus = Bus()
        self.crashed: list[str] = []  # node ids gone but not yet declared dead
        self.dead: set[str] = set()
        #: sid -> (slot, node id, peer, app, channels it is in)
        self.live: dict[str, tuple[int, str, Peer, str, set[str]]] = {}
        self.next = 0

    # -- helpers ------------------------------------------------------------------------

    def alive(self) -> list[int]:
        return [i for i in range(SLOTS) if self.nodes[i] is not None]

    def local(self, slot: int, app: str, channel: str) -> set[str]:
        return {sid for sid, (s, _, _, a, chs) in self.live.items()
                if s == slot and a == app and channel in chs}

    def run(self, slot: int, actions: list) -> None:
        for action in actions:
            if isinstance(action, Publish):
                others = [i for i in self.alive() if i != slot]
                self.bus.publish(self.ids[slot], action.sig, others)

    def handle(self, sid: str, sig: Signalling) -> None:
        slot, _, peer, app, chs = self.live[sid]
        node = self.nodes[slot]
        assert node is not None
        actions = node.handle(peer, sig)
        if sig.op == "channel_join":
            chs.add(sig.c)
        elif sig.c in chs:
            targets = {s for targets, _ in frames(actions) for s in targets}
            expected = self.local(slot, app, sig.c) - {sid}
            if self.DEDUPE and sig.op == "peer_state":
                assert targets <= expected  # only those lacking it (checked on clients below)
            else:
                assert targets == expected
            if sig.op == "peer_offline":
                chs.discard(sig.c)
        else:
            assert actions == []
        self.run(slot, actions)

    # -- peers ----------------------------------------------------------------------------

    @rule(slot=st.integers(0, SLOTS - 1), app=st.sampled_from(["app1", "app1", "app2"]),
          channel=st.sampled_from(MESH_CHANNELS))
    def connect_and_join(self, slot: int, app: str, channel: str) -> None:
        if self.nodes[slot] is None:
            return
        self.next += 1
        sid = f"s{self.next}"
        peer = Peer(sid=sid, client_id=f"u{self.next}", app=app, transport="test")
        self.nodes[slot].connect(peer)
        self.live[sid] = (slot, self.ids[slot], peer, app, set())
        state = msgpack.packb({"id": peer.client_id})
        self.handle(sid, Signalling(t="control", op="channel_join", c=channel, pl=state))
        self.handle(sid, Signalling(t="control", op="peer_online", c=channel))
        self.handle(sid, Signalling(t="control", op="peer_state", c=channel, pl=state))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), channel=st.sampled_from(MESH_CHANNELS),
          op=st.sampled_from(["channel_join", "peer_online", "peer_state", "data",
                              "peer_offline"]))
    def send(self, data: st.DataObject, channel: str, op: str) -> None:
        sid = data.draw(st.sampled_from(sorted(self.live)))
        peer = self.live[sid][2]
        if op == "data":
            sig = Signalling(t="data", c=channel, pl=msgpack.packb({"event": "e", "data": "1"}))
        else:
            pl = msgpack.packb({"id": peer.client_id}) if op in ("channel_join",
                                                                 "peer_state") else None
            sig = Signalling(t="control", op=op, c=channel, pl=pl)
        self.handle(sid, sig)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.live)))
        slot, _, peer, _app, _chs = self.live.pop(sid)
        node = self.nodes[slot]
        assert node is not None
        self.run(slot, node.disconnect(peer))

    # -- the bus and the nodes ------------------------------------------------------------

    def _deliver(self, origin: str, dest: int, count: int) -> None:
        node = self.nodes[dest]
        assert node is not None
        queue = self.bus.queues[(origin, dest)]
        for sig in queue[:count]:
            actions = node.dispatch_remote(sig, origin)
            members = self.local(dest, sig.app or "", sig.c)
            targets = {s for targets, _ in frames(actions) for s in targets}
            if self.DEDUPE and sig.op == "peer_state":
                assert targets <= members
            else:
                assert targets == members
        del queue[:count]

    @precondition(lambda self: self.bus.busy())
    @rule(data=st.data(), count=st.integers(1, 4))
    def deliver_some(self, data: st.DataObject, count: int) -> None:
        origin, dest = data.draw(st.sampled_from(self.bus.busy()))
        self._deliver(origin, dest, count)

    @precondition(lambda self: self.bus.busy())
    @rule()
    def deliver_all(self) -> None:
        for origin, dest in self.bus.busy():
            self._deliver(origin, dest, len(self.bus.queues[(origin, dest)]))

    @initialize()
    def one_peer_per_node(self) -> None:
        for slot in range(SLOTS):
            self.connect_and_join(slot, "app1", "a")
        self.deliver_all()

    @precondition(lambda self: len(self.alive()) > 1)
    @rule(data=st.data(), lose_in_flight=st.booleans())
    def crash(self, data: st.DataObject, lose_in_flight: bool) -> None:
        """kill -9: peers vanish unannounced; what was in flight may be lost."""
        slot = data.draw(st.sampled_from(self.alive()))
        self.nodes[slot] = None
        self.crashed.append(self.ids[slot])
        self.bus.drop(dest=slot)
        if lose_in_flight:
            self.bus.drop(origin=self.ids[slot])
        for sid in [s for s, v in self.live.items() if v[0] == slot]:
            del self.live[sid]

    def _ready_to_declare(self) -> list[str]:
        return [n for n in self.crashed if not any(o == n for o, _ in self.bus.busy())]

    @precondition(lambda self: self._ready_to_declare())
    @rule(data=st.data())
    def declare_dead(self, data: st.DataObject) -> None:
        """NODE_TIMEOUT later (far longer than any transit: nothing of it is in flight)."""
        gone = data.draw(st.sampled_from(self._ready_to_declare()))
        self.crashed.remove(gone)
        self.dead.add(gone)
        for slot in self.alive():
            node = self.nodes[slot]
            assert node is not None
            expected = Counter()
            for app, realm in node.realms.items():
                for name, channel in realm.channels.items():
                    for (nid, _sid), cid in channel.remote.items():
                        if nid == gone:
                            expected[(app, name, cid)] += 1
            actions = node.node_down(gone)
            got: Counter = Counter()
            for action in actions:
                assert isinstance(action, Deliver)
                frame = msgpack.unpackb(action.frame)
                assert frame["op"] == "peer_offline"
                (app,) = {p.app for p in action.peers}
                assert {p.sid for p in action.peers} == self.local(slot, app, frame["c"])
                got[(app, frame["c"], frame["p"])] += 1
            assert got == expected  # exactly one offline per member it had from that node

    @precondition(lambda self: len(self.alive()) < SLOTS)
    @rule(data=st.data())
    def restart(self, data: st.DataObject) -> None:
        """The same MESH_ID, a new process: a new node id and no memory."""
        slot = data.draw(st.sampled_from([i for i in range(SLOTS) if self.nodes[i] is None]))
        self.gen[slot] += 1
        self.ids[slot] = f"m{slot}-{self.gen[slot]}"
        self.nodes[slot] = Presence(f"m{slot}", dedupe_state=self.DEDUPE)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def no_member_outlives_its_node_connection_or_channel(self) -> None:
        actual = {(v[1], sid): (v[3], v[4]) for sid, v in self.live.items()}
        quiet = not self.bus.busy() and not self.crashed
        for slot in self.alive():
            node = self.nodes[slot]
            assert node is not None
            pending = self.bus.pending_to(slot)
            for app, realm in node.realms.items():
                for name, channel in realm.channels.items():
                    assert channel.peers  # freed with its last local peer
                    for key in channel.remote:
                        nid = key[0]
                        assert nid not in self.dead, f"member of dead node {nid} resurrected"
                        assert nid != self.ids[slot]  # never our own peers
                        where = actual.get(key)
                        ok = where is not None and where[0] == app and name in where[1]
                        if quiet:
                            assert ok, f"stale remote member {key} in {app}/{name}"
                        else:
                            assert ok or nid in pending or nid in self.crashed


MeshMachine.TestCase.settings = settings(max_examples=110, stateful_step_count=50,
                                         deadline=None)
test_mesh_rules = MeshMachine.TestCase


class DedupeMeshMachine(MeshMachine):
    """The same rules and invariants with peer_state dedupe on."""

    DEDUPE = True


DedupeMeshMachine.TestCase.settings = MeshMachine.TestCase.settings
test_mesh_rules_with_dedupe = DedupeMeshMachine.TestCase


# -- what the real clients end up showing, with and without dedupe ------------------------
#
# Each connection runs @yomo/presence 2.2.18's Channel logic for every Channel object it
# made (one per joinChannel), and every object reads every frame of the connection (no
# filtering by channel): a join ack makes every object send peer_online + peer_state, a
# peer_online makes every object reset that member and answer with its own state. The
# same history runs on two meshes, one with dedupe; everything in flight is delivered in
# order after each step. A client changes its state by sending peer_state on each of its
# channels (the protocol allows it; the real client re-joins instead).


@dataclass
class ChannelObject:
    c: str
    members: dict[str, bytes | None] = field(default_factory=dict)
    acked: bool = False


@dataclass
class Conn:
    cid: str
    slot: int
    peer: Peer
    state: bytes
    objects: list[ChannelObject] = field(default_factory=list)
    joined: set[str] = field(default_factory=set)
    #: Objects before this index were made before a leave: they keep members of the
    #: channel left (the real client never clears them); not checked.
    fresh_from: int = 0
    #: False once an offline removed a member that still shares another channel with
    #: this connection: the real client drops it from every channel (not checked).
    coherent: bool = True


class World:
    def __init__(self, dedupe: bool) -> None:
        self.nodes: list[Presence | None] = [Presence(f"m{i}", dedupe_state=dedupe)
                                             for i in range(SLOTS)]
        self.ids = [f"m{i}-0" for i in range(SLOTS)]
        self.dedupe = dedupe
        self.conns: dict[str, Conn] = {}
        self.queue: deque[tuple[str, Any, Any]] = deque()
        self.deliveries = 0

    def up(self, conn: Conn, op: str, c: str, pl: bytes | None = None) -> None:
        self.queue.append(("up", conn.cid, Signalling(t="control", op=op, c=c, pl=pl)))

    def run(self, slot: int, actions: list) -> None:
        for action in actions:
            if isinstance(action, Deliver):
                frame = msgpack.unpackb(action.frame)
                for peer in action.peers:
                    self.deliveries += 1
                    self.queue.append(("down", (peer.client_id, peer.sid), frame))
            elif isinstance(action, Publish):
                self.queue.append(("mesh", (slot, self.ids[slot]), action.sig))

    def pump(self) -> None:
        while self.queue:
            kind, who, item = self.queue.popleft()
            if kind == "up":
                conn = self.conns.get(who)
                if conn is not None:
                    node = self.nodes[conn.slot]
                    assert node is not None
                    self.run(conn.slot, node.handle(conn.peer, item))
            elif kind == "mesh":
                origin, origin_id = who
                for slot, node in enumerate(self.nodes):
                    if node is not None and slot != origin:
                        self.run(slot, node.dispatch_remote(item, origin_id))
            elif (conn := self.conns.get(who[0])) is not None and conn.peer.sid == who[1]:
                self.on_frame(conn, item)

    def on_frame(self, conn: Conn, msg: dict[str, Any]) -> None:
        """@yomo/presence: every Channel object of the connection reads the frame."""
        op, p = msg.get("op"), msg.get("p")
        if msg["t"] != "control":
            return
        if op == "channel_join":
            for obj in conn.objects:
                obj.acked = True
                self.up(conn, "peer_online", obj.c)
                self.up(conn, "peer_state", obj.c, conn.state)
            return
        if p == conn.cid:
            return
        if op == "peer_offline":
            other = self.conns.get(p)
            if other is not None and other.joined & conn.joined - {msg["c"]}:
                conn.coherent = False
        for obj in conn.objects:
            if op == "peer_online":
                obj.members[p] = None
                self.up(conn, "peer_state", obj.c, conn.state)
            elif op == "peer_state":
                obj.members[p] = msg["pl"]
            elif op == "peer_offline":
                obj.members.pop(p, None)

    def views(self) -> dict[tuple[str, int], dict[str, bytes | None]]:
        return {(cid, i): dict(obj.members) for cid, conn in self.conns.items()
                for i, obj in enumerate(conn.objects)
                if i >= conn.fresh_from and obj.acked and obj.c in conn.joined}

    def truth(self, cid: str) -> dict[str, bytes | None]:
        me = self.conns[cid]
        return {o.cid: o.state for o in self.conns.values()
                if o.cid != cid and o.joined & me.joined}


class ClientViewMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.worlds = [World(False), World(True)]
        self.next = 0
        self.version = 0
        self.pending_down: list[tuple[int, str]] = []
        #: Clients whose node crashed: (id, channels) — they may come back elsewhere.
        self.lost: list[tuple[str, list[str]]] = []

    def live(self) -> list[str]:
        return sorted(self.worlds[0].conns)

    def step(self, fn: Any) -> None:
        for world in self.worlds:
            fn(world)
            world.pump()

    @rule(slot=st.integers(0, SLOTS - 1), channel=st.sampled_from(MESH_CHANNELS))
    def connect_and_join(self, slot: int, channel: str) -> None:
        if self.worlds[0].nodes[slot] is None:
            return
        self.next += 1
        cid = f"u{self.next}"

        def go(world: World) -> None:
            node = world.nodes[slot]
            assert node is not None
            peer = Peer(sid=cid, client_id=cid, app="app", transport="sim")
            node.connect(peer)
            conn = world.conns[cid] = Conn(cid, slot, peer, msgpack.packb({"id": cid}))
            self.join(world, conn, channel)

        self.step(go)

    @staticmethod
    def join(world: World, conn: Conn, channel: str) -> None:
        conn.objects.append(ChannelObject(channel))
        conn.joined.add(channel)
        world.up(conn, "channel_join", channel, conn.state)

    @precondition(lambda self: self.worlds[0].conns)
    @rule(data=st.data(), channel=st.sampled_from(MESH_CHANNELS))
    def join_another(self, data: st.DataObject, channel: str) -> None:
        cid = data.draw(st.sampled_from(self.live()))
        self.step(lambda w: self.join(w, w.conns[cid], channel))

    @precondition(lambda self: self.worlds[0].conns)
    @rule(data=st.data(), channel=st.sampled_from(MESH_CHANNELS))
    def leave(self, data: st.DataObject, channel: str) -> None:
        cid = data.draw(st.sampled_from(self.live()))

        def go(world: World) -> None:
            conn = world.conns[cid]
            if channel in conn.joined:
                conn.joined.discard(channel)
                conn.fresh_from = len(conn.objects)
                world.up(conn, "peer_offline", channel)

        self.step(go)

    @precondition(lambda self: self.worlds[0].conns)
    @rule(data=st.data())
    def change_state(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(self.live()))
        self.version += 1

        def go(world: World) -> None:
            conn = world.conns[cid]
            conn.state = msgpack.packb({"id": cid, "v": self.version})
            for channel in sorted(conn.joined):
                world.up(conn, "peer_state", channel, conn.state)

        self.step(go)

    @precondition(lambda self: self.worlds[0].conns)
    @rule(data=st.data())
    def reannounce(self, data: st.DataObject) -> None:
        """A join ack out of the blue: what the node's resync sends after an outage."""
        cid = data.draw(st.sampled_from(self.live()))

        def go(world: World) -> None:
            conn = world.conns[cid]
            if conn.joined:
                world.on_frame(conn, {"t": "control", "op": "channel_join",
                                      "c": min(conn.joined)})

        self.step(go)

    @precondition(lambda self: self.worlds[0].conns)
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(self.live()))

        def go(world: World) -> None:
            conn = world.conns.pop(cid)
            node = world.nodes[conn.slot]
            assert node is not None
            world.run(conn.slot, node.disconnect(conn.peer))

        self.step(go)

    @precondition(lambda self: sum(n is not None for n in self.worlds[0].nodes) > 1)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(
            [i for i, n in enumerate(self.worlds[0].nodes) if n is not None]))
        self.pending_down.append((slot, self.worlds[0].ids[slot]))

        for cid, conn in sorted(self.worlds[0].conns.items()):
            if conn.slot == slot:
                self.lost.append((cid, sorted(conn.joined)))

        def go(world: World) -> None:
            world.nodes[slot] = None
            for cid in [c for c, conn in world.conns.items() if conn.slot == slot]:
                del world.conns[cid]

        self.step(go)

    @precondition(lambda self: self.lost)
    @rule(data=st.data())
    def come_back_elsewhere(self, data: st.DataObject) -> None:
        """A client of a crashed node reconnects with the same id to a live node, maybe
        before its old node is declared dead (the stale offline must not remove it)."""
        cid, channels = self.lost.pop(data.draw(st.integers(0, len(self.lost) - 1)))
        slot = data.draw(st.sampled_from(
            [i for i, n in enumerate(self.worlds[0].nodes) if n is not None]))
        if cid in self.worlds[0].conns or not channels:
            return
        self.next += 1

        def go(world: World) -> None:
            node = world.nodes[slot]
            assert node is not None
            peer = Peer(sid=f"{cid}#{self.next}", client_id=cid, app="app", transport="sim")
            node.connect(peer)
            conn = world.conns[cid] = Conn(cid, slot, peer, msgpack.packb({"id": cid}))
            for channel in channels:
                self.join(world, conn, channel)

        self.step(go)

    @precondition(lambda self: self.pending_down)
    @rule()
    def declare_dead_and_restart(self) -> None:
        slot, gone = self.pending_down.pop(0)

        def go(world: World) -> None:
            for i, node in enumerate(world.nodes):
                if node is not None:
                    world.run(i, node.node_down(gone))
            if world.nodes[slot] is None:
                world.nodes[slot] = Presence(f"m{slot}", dedupe_state=world.dedupe)
                world.ids[slot] = gone + "'"

        self.step(go)

    @invariant()
    def every_member_shows_every_other_members_latest_state(self) -> None:
        plain, deduped = self.worlds
        assert deduped.deliveries <= plain.deliveries
        if self.pending_down:
            return  # members of a crashed node stay listed until it is declared dead
        plain_views, deduped_views = plain.views(), deduped.views()
        assert plain_views.keys() == deduped_views.keys()
        for (cid, i), view in deduped_views.items():
            if plain.conns[cid].coherent and deduped.conns[cid].coherent:
                assert view == plain_views[(cid, i)], (cid, i)
                assert view == deduped.truth(cid), (cid, i)


ClientViewMachine.TestCase.settings = settings(max_examples=110, stateful_step_count=30,
                                               deadline=None)
test_client_views_with_and_without_dedupe = ClientViewMachine.TestCase
