"""Property-based tests of the pure core: hostile bytes in, invariants kept."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from node import protocol
from node.presence import Deliver, Interest, Peer, Presence, Publish
from node.protocol import ProtocolError, Signalling

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


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
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
        assert offline == ([(frozenset(others), offline[0][1])] if others else [])
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
        # Exactly one offline per channel, to exactly the remaining members.
        expected = {ch: frozenset(self.members(app, ch) - {sid}) for ch in chs}
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


PresenceMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                             deadline=None)
test_presence_rules = PresenceMachine.TestCase
