"""The grace period in the rules: a vanished peer is held, released, or back in time."""

from __future__ import annotations

import msgpack
import pytest

from node import protocol
from node.presence import Hold, Interest, Member, Peer, Presence, Publish, Returned
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


# -- a silent peer: past the soft keepalive timeout, its connection still open -----------


def alice_and_bob(dedupe_state: bool = False) -> tuple[Presence, Peer, Peer]:
    pr = Presence("eu", dedupe_state=dedupe_state)
    alice, bob = make(pr, "1", "alice"), make(pr, "2", "bob")
    joined(pr, alice, bob)
    return pr, alice, bob


def test_a_silent_peer_is_held_but_still_delivered_to_and_back_in_time_nobody_knew() -> None:
    pr, alice, bob = alice_and_bob()
    assert pr.silence(alice) == [Hold(alice)]
    assert pr.silence(alice) == []  # once
    channel = pr.realms["app"].channels["room"]
    assert "1" in pr.peers and "1" in channel.held  # still connected, held in the channel
    # A late pong must not cost it anything: what the channel says still reaches it.
    assert frames_to(pr.handle(bob, sig(None)), alice)
    back = pr.heard(alice)
    assert back == [Returned(alice, "room")]  # no frame, no publish: nothing visible
    assert "1" not in channel.held and channel.peers["1"] is alice and not alice.silent
    assert pr.release(alice, "room") == []  # the grace timer, had it fired after: nothing
    assert pr.heard(alice) == []


def test_a_silent_peer_released_then_heard_rejoins_with_its_last_state() -> None:
    pr, alice, bob = alice_and_bob(dedupe_state=True)
    state = msgpack.packb({"id": "alice", "cursor": [3, 4]})
    pr.handle(alice, sig("peer_state", pl=state))
    pr.silence(alice)
    released = pr.release(alice, "room")
    assert frames_to(released, bob) == [{"t": "control", "op": "peer_offline", "c": "room",
                                         "p": "alice"}]
    assert Member("app", "room", "alice", False, after_grace=True) in released
    assert alice.released == {"room": state} and "room" not in alice.channels
    # Offline for everyone: nothing reaches it any more.
    assert not frames_to(pr.handle(bob, sig(None)), alice)
    back = pr.heard(alice)
    # Bob sees it come online with its last state, as after a join; alice gets no ack (its
    # page never knew); the mesh hears both; its membership starts again.
    assert frames_to(back, bob) == [
        {"t": "control", "op": "peer_online", "c": "room", "p": "alice"},
        {"t": "control", "op": "peer_state", "c": "room", "p": "alice", "pl": state}]
    assert frames_to(back, alice) == []
    assert [(a.sig.op, a.sig.sid) for a in back if isinstance(a, Publish)] == [
        ("peer_online", "1"), ("peer_state", "1")]
    assert Member("app", "room", "alice", True) in back
    assert alice.released is None and not alice.silent and "room" in alice.channels
    # Bob answers the online with his state: alice (waiting since her re-join) gets it.
    bob_state = msgpack.packb({"id": "bob"})
    assert frames_to(pr.handle(bob, sig("peer_state", pl=bob_state)), alice)


def test_a_silent_peer_rejoins_a_channel_freed_meanwhile_and_it_is_listened_to_again() -> None:
    pr = Presence("eu")
    alice = make(pr, "1", "alice")
    joined(pr, alice)
    pr.silence(alice)
    assert Interest("app", "room", False) in pr.release(alice, "room")
    back = pr.heard(alice)
    assert Interest("app", "room", True) in back
    assert pr.realms["app"].channels["room"].peers == {"1": alice}


def test_a_silent_peer_leaving_cleanly_is_offline_at_once_and_nothing_stays_held() -> None:
    pr, alice, bob = alice_and_bob()
    pr.silence(alice)
    gone = pr.disconnect(alice)
    assert frames_to(gone, bob)[0]["op"] == "peer_offline"
    assert not pr.realms["app"].channels["room"].held
    assert pr.release(alice, "room") == []


def test_a_silent_peer_whose_connection_then_vanished_stays_held_until_released() -> None:
    pr, alice, bob = alice_and_bob()
    pr.silence(alice)
    pr.hold(alice)  # the hard timeout: out of the delivery lists, still held
    channel = pr.realms["app"].channels["room"]
    assert "1" not in channel.peers and "1" in channel.held and "1" not in pr.peers
    assert not frames_to(pr.handle(bob, sig(None)), alice)
    assert frames_to(pr.release(alice, "room"), bob)[0]["op"] == "peer_offline"


def test_a_silent_peer_whose_id_came_back_on_another_connection_leaves_that_channel() -> None:
    pr, alice, _ = alice_and_bob()
    pr.silence(alice)
    again = make(pr, "3", "alice")
    joined(pr, again)
    assert Returned(alice, "room") in pr.handle(again, sig("peer_online"))
    channel = pr.realms["app"].channels["room"]
    assert "1" not in channel.peers and "room" not in alice.channels
    assert pr.heard(alice) == []  # in no channel any more: nothing to re-join
