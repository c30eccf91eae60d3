"""The grace period in the rules: a vanished peer is held, released, or back in time."""

from __future__ import annotations

import msgpack
import pytest

from node import protocol
from node.presence import Hold, Interest, Member, Presence, Publish, Returned
from node.protocol import Signalling
from tests.test_presence import frames_to, joined, make, sig

pytestmark = pytest.mark.unit


def offline_publishes(actions: list) -> list[Signalling]:
    return [a.sig for a in actions if isinstance(a, Publish)
            and a.sig.op == protocol.PEER_OFFLINE]


def test_a_vanished_peer_is_held_silently_then_released_with_its_offline() -> None:
    pr = Presence("eu")
    alice, bob = make(pr, "1", "alice"), make(pr, "2", "bob")
    joined(pr, alice, bob)
    held = pr.hold(alice)
    assert held == [Hold(alice)]  # nobody hears anything, the channel stays
    assert "1" not in pr.peers and "1" in pr.realms["app"].channels["room"].held
    # Held: no delivery to it, and it still counts as a member (a second tab leaving
    # cleanly tells nobody).
    out = pr.handle(bob, sig(None))
    assert not any(alice in getattr(a, "peers", ()) for a in out)
    released = pr.release(alice, "room")
    assert frames_to(released, bob) == [{"t": "control", "op": "peer_offline", "c": "room",
                                         "p": "alice"}]
    assert [s.sid for s in offline_publishes(released)] == ["1"]
    assert Member("app", "room", "alice", False, after_grace=True) in released
    assert pr.release(alice, "room") == []  # once


def test_back_on_this_node_no_offline_and_the_old_connection_leaves_the_mesh_quietly() -> None:
    pr = Presence("eu")
    alice, bob = make(pr, "1", "alice"), make(pr, "2", "bob")
    joined(pr, alice, bob)
    pr.hold(alice)
    again = make(pr, "3", "alice")
    join = pr.handle(again, sig("channel_join", pl=msgpack.packb({"id": "alice"})))
    assert not any(isinstance(a, Member) for a in join)  # it never left
    back = pr.handle(again, sig("peer_online"))
    assert Returned(alice, "room") in back
    assert frames_to(back, bob) == [{"t": "control", "op": "peer_online", "c": "room",
                                     "p": "alice"}]
    publishes = [a.sig for a in back if isinstance(a, Publish)]
    # The new connection's online goes out first, then the old one's offline: other
    # nodes see the id present and tell nobody.
    assert [(s.op, s.sid) for s in publishes] == [("peer_online", "3"), ("peer_offline", "1")]
    assert not any(isinstance(a, Member) for a in back)
    assert pr.release(alice, "room") == []  # the timer may still fire: nothing happens
    # Leaving cleanly later is instant, as always.
    gone = pr.handle(again, sig("peer_offline"))
    assert frames_to(gone, bob)[0]["op"] == "peer_offline"


def test_back_on_another_node_ends_membership_here_and_frees_the_channel() -> None:
    pr = Presence("eu")
    alice = make(pr, "1", "alice")
    joined(pr, alice)
    pr.hold(alice)
    assert pr.channel_count() == 1  # held keeps our interest: the return must reach us
    online = Signalling(t="control", op="peer_online", c="room", p="alice", sid="9",
                        app="app", mesh="us")
    back = pr.dispatch_remote(online, "node-us")
    assert Returned(alice, "room") in back
    assert [s.sid for s in offline_publishes(back)] == ["1"]
    assert Member("app", "room", "alice", False, after_grace=True) in back
    assert Interest("app", "room", False) in back
    assert pr.channel_count() == 0


def test_another_id_coming_online_does_not_cancel_a_hold() -> None:
    pr = Presence("eu")
    alice, bob = make(pr, "1", "alice"), make(pr, "2", "bob")
    joined(pr, alice, bob)
    pr.hold(alice)
    out = pr.handle(bob, sig("peer_online"))
    assert not any(isinstance(a, Returned) for a in out)
    assert frames_to(pr.release(alice, "room"), bob)[0]["op"] == "peer_offline"


def test_a_held_peer_in_two_channels_can_come_back_to_one() -> None:
    pr = Presence("eu")
    alice, bob = make(pr, "1", "alice"), make(pr, "2", "bob")
    joined(pr, alice, bob, c="a")
    joined(pr, alice, bob, c="b")
    pr.hold(alice)
    again = make(pr, "3", "alice")
    joined(pr, again, c="a")
    assert Returned(alice, "a") in pr.handle(again, sig("peer_online", c="a"))
    assert pr.release(alice, "a") == []
    assert frames_to(pr.release(alice, "b"), bob)[0] == {
        "t": "control", "op": "peer_offline", "c": "b", "p": "alice"}


def test_a_second_tab_leaving_while_the_first_is_held_tells_nobody() -> None:
    pr = Presence("eu")
    tab1, tab2, bob = make(pr, "1", "alice"), make(pr, "2", "alice"), make(pr, "3", "bob")
    joined(pr, tab1, tab2, bob)
    pr.hold(tab1)
    assert frames_to(pr.disconnect(tab2), bob) == []
    assert frames_to(pr.release(tab1, "room"), bob)[0]["op"] == "peer_offline"
