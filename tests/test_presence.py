"""The presence rules, without sockets: who hears what."""

from __future__ import annotations

import msgpack
import pytest

from node import protocol
from node.presence import Deliver, Interest, Peer, Presence, Publish, local_peers
from node.protocol import Signalling

pytestmark = pytest.mark.unit


def sig(op: str | None, c: str = "room", pl: bytes | None = None) -> Signalling:
    if op is None:
        return Signalling(t="data", c=c, pl=pl or msgpack.packb({"event": "e", "data": "1"}))
    return Signalling(t="control", op=op, c=c, pl=pl)


def make(presence: Presence, sid: str, client_id: str | None = None, app: str = "app") -> Peer:
    peer = Peer(sid=sid, client_id=client_id or f"user-{sid}", app=app, transport="test")
    presence.connect(peer)
    return peer


def frames_to(actions: list, peer: Peer) -> list[dict]:
    return [msgpack.unpackb(a.frame) for a in actions if isinstance(a, Deliver) and peer in a.peers]


def joined(presence: Presence, *peers: Peer, c: str = "room") -> None:
    for p in peers:
        presence.handle(p, sig("channel_join", c, msgpack.packb({"id": p.client_id})))


def test_join_acks_only_the_joiner_and_opens_interest() -> None:
    pr = Presence("eu")
    a, b = make(pr, "1"), make(pr, "2")
    joined(pr, a)
    actions = pr.handle(b, sig("channel_join", pl=msgpack.packb({"id": "b"})))
    assert frames_to(actions, b) == [{"t": "control", "op": "channel_join", "c": "room", "mesh": "eu"}]
    assert frames_to(actions, a) == []
    assert not any(isinstance(x, Publish) for x in actions)  # joins stay local
    first = pr.handle(make(pr, "3"), sig("channel_join", c="new"))
    assert Interest("app", "new", True) in first


def test_forward_to_others_with_sender_id_never_back() -> None:
    pr = Presence("eu")
    a, b, c = make(pr, "1", "alice"), make(pr, "2", "bob"), make(pr, "3", "carol")
    joined(pr, a, b, c)
    actions = pr.handle(a, sig("peer_online"))
    assert local_peers(actions) == [b, c]
    assert frames_to(actions, b) == [{"t": "control", "op": "peer_online", "c": "room", "p": "alice"}]
    (publish,) = [x for x in actions if isinstance(x, Publish)]
    assert (publish.sig.p, publish.sig.sid, publish.sig.app, publish.sig.mesh) == (
        "alice", "1", "app", "eu")


def test_one_encoding_per_message() -> None:
    pr = Presence("eu")
    peers = [make(pr, str(i)) for i in range(5)]
    joined(pr, *peers)
    actions = pr.handle(peers[0], sig(None))
    delivers = [x for x in actions if isinstance(x, Deliver)]
    assert len(delivers) == 1 and len(delivers[0].peers) == 4


def test_frames_for_unjoined_channel_are_dropped_and_counted() -> None:
    pr = Presence("eu")
    a, b = make(pr, "1"), make(pr, "2")
    joined(pr, b)
    assert pr.handle(a, sig(None)) == []
    assert pr.handle(a, sig("peer_state", pl=msgpack.packb({}))) == []
    assert pr.dropped["not_joined"] == 2


def test_leave_tells_others_then_drops_later_frames() -> None:
    pr = Presence("eu")
    a, b = make(pr, "1", "alice"), make(pr, "2")
    joined(pr, a, b)
    actions = pr.handle(a, sig("peer_offline"))
    assert frames_to(actions, b) == [{"t": "control", "op": "peer_offline", "c": "room", "p": "alice"}]
    assert pr.handle(a, sig(None)) == []  # left: broadcasts are dropped, not forwarded
    assert pr.dropped["not_joined"] == 1
    # b still hears nothing from a, but the channel lives on for b
    assert "room" in pr.realms["app"].channels


def test_disconnect_offline_in_every_channel_and_frees() -> None:
    pr = Presence("eu")
    a, b, c = make(pr, "1", "alice"), make(pr, "2"), make(pr, "3")
    joined(pr, a, b, c="x")
    joined(pr, a, c, c="y")
    actions = pr.disconnect(a)
    assert frames_to(actions, b) == [{"t": "control", "op": "peer_offline", "c": "x", "p": "alice"}]
    assert frames_to(actions, c) == [{"t": "control", "op": "peer_offline", "c": "y", "p": "alice"}]
    assert "1" not in pr.peers
    for p in (b, c):
        pr.disconnect(p)
    assert pr.realms == {} and pr.peers == {}


def test_last_peer_leaving_frees_channel_and_interest() -> None:
    pr = Presence("eu")
    a = make(pr, "1")
    joined(pr, a)
    actions = pr.handle(a, sig("peer_offline"))
    assert Interest("app", "room", False) in actions
    assert pr.realms == {}


def test_apps_are_isolated() -> None:
    pr = Presence("eu")
    a, b = make(pr, "1", app="one"), make(pr, "2", app="two")
    joined(pr, a, b)
    assert local_peers(pr.handle(a, sig(None))) == []


def test_same_client_id_twice_is_two_peers() -> None:
    pr = Presence("eu")
    tab1, tab2 = make(pr, "1", "alice"), make(pr, "2", "alice")
    joined(pr, tab1, tab2)
    assert local_peers(pr.handle(tab1, sig(None))) == [tab2]
    pr.disconnect(tab1)
    assert list(pr.realms["app"].channels["room"].peers) == ["2"]


def test_rejoin_reacks_without_duplicating() -> None:
    pr = Presence("eu")
    a, b = make(pr, "1"), make(pr, "2")
    joined(pr, a, b)
    joined(pr, a)
    assert local_peers(pr.handle(b, sig(None))) == [a]


def test_remote_events_reach_every_local_peer_and_node_down_offlines_them() -> None:
    pr = Presence("eu")
    a, b = make(pr, "1"), make(pr, "2")
    joined(pr, a, b)
    remote = Signalling(t="control", op="peer_online", c="room", p="zed", sid="9", app="app",
                        mesh="us")
    actions = pr.dispatch_remote(remote, "us-node")
    assert local_peers(actions) == [a, b]
    assert msgpack.unpackb(actions[0].frame) == {"t": "control", "op": "peer_online", "c": "room",
                                                "p": "zed"}
    down = pr.node_down("us-node")
    assert frames_to(down, a) == [{"t": "control", "op": "peer_offline", "c": "room", "p": "zed"}]
    assert pr.node_down("us-node") == []  # exactly once


def test_remote_offline_forgets_member() -> None:
    pr = Presence("eu")
    a = make(pr, "1")
    joined(pr, a)
    base = dict(c="room", p="zed", sid="9", app="app", mesh="us")
    pr.dispatch_remote(Signalling(t="control", op="peer_state", pl=b"\x80", **base), "n")
    pr.dispatch_remote(Signalling(t="control", op="peer_offline", **base), "n")
    assert pr.node_down("n") == []


def test_remote_event_for_unknown_channel_is_counted() -> None:
    pr = Presence("eu")
    remote = Signalling(t="data", c="nobody", p="z", sid="1", app="app", pl=b"\x80")
    assert pr.dispatch_remote(remote, "n") == []
    assert pr.dropped["no_local_channel"] == 1


def test_snapshot_lists_peers() -> None:
    pr = Presence("eu")
    a = make(pr, "1", "alice")
    joined(pr, a)
    snap = pr.snapshot()
    assert snap["app"]["room"]["peers"][0]["id"] == "alice"
    assert protocol.CONTROL == "control"
