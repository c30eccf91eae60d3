"""The membership webhooks without sockets: member transitions in the rules, the signature,
batching and backoff schedules, the queue bound, the grace window, the occupancy decision."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.config import Settings
from node.grace import Grace
from node.occupancy import Occupancy, event_id, occupied, vacated_last
from node.presence import Member, Peer, Presence
from node.protocol import Signalling
from node.webhooks import (
    BACKOFF_CAP,
    DROP_LOG_EVERY,
    Event,
    Sender,
    Webhooks,
    backoff,
    batch_due,
    iso_ms,
    retryable,
    sign,
    verify,
)
from tests.mesh_helpers import wait_until

pytestmark = pytest.mark.unit


# -- member transitions in the rules -------------------------------------------------------


def peer(presence: Presence, sid: str, client_id: str, app: str = "app") -> Peer:
    p = Peer(sid=sid, client_id=client_id, app=app, transport="test")
    presence.connect(p)
    return p


def join(presence: Presence, p: Peer, c: str = "room") -> list[Member]:
    actions = presence.handle(p, Signalling(t="control", op="channel_join", c=c,
                                            pl=msgpack.packb({"id": p.client_id})))
    return [a for a in actions if isinstance(a, Member)]


def leave(presence: Presence, p: Peer, c: str = "room") -> list[Member]:
    actions = presence.handle(p, Signalling(t="control", op="peer_offline", c=c))
    return [a for a in actions if isinstance(a, Member)]


def gone(presence: Presence, p: Peer) -> list[Member]:
    return [a for a in presence.disconnect(p) if isinstance(a, Member)]


def test_two_tabs_of_one_id_one_joined_one_left() -> None:
    pr = Presence("eu")
    tab1, tab2 = peer(pr, "1", "alice"), peer(pr, "2", "alice")
    assert join(pr, tab1) == [Member("app", "room", "alice", True)]
    assert join(pr, tab2) == []  # the id is here already
    assert join(pr, tab2) == []  # a re-join is no transition
    assert leave(pr, tab1) == []  # tab 2 stays
    assert gone(pr, tab2) == [Member("app", "room", "alice", False)]


def test_other_ids_other_channels_other_apps_are_their_own_transitions() -> None:
    pr = Presence("eu")
    a, b, c = peer(pr, "1", "alice"), peer(pr, "2", "bob"), peer(pr, "3", "alice", app="other")
    assert join(pr, a) == [Member("app", "room", "alice", True)]
    assert join(pr, a, "hall") == [Member("app", "hall", "alice", True)]
    assert join(pr, b) == [Member("app", "room", "bob", True)]
    assert join(pr, c) == [Member("other", "room", "alice", True)]
    assert sorted(gone(pr, a), key=lambda m: m.channel) == [
        Member("app", "hall", "alice", False), Member("app", "room", "alice", False)]


def test_the_same_id_on_another_node_does_not_hide_a_local_transition() -> None:
    pr = Presence("eu")
    a = peer(pr, "1", "alice")
    join(pr, a)
    pr.dispatch_remote(Signalling(t="control", op="peer_online", c="room", p="alice",
                                  sid="9", app="app"), "us-1")
    # Remote peers see alice stay (no peer_offline delivered), but she left this node.
    assert leave(pr, a) == [Member("app", "room", "alice", False)]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["join", "leave", "gone"]), st.integers(0, 4),
                          st.sampled_from(["r1", "r2"])), max_size=40))
def test_member_actions_are_exactly_the_local_transitions_of_an_id(steps: list) -> None:
    """Model: connections per (channel, id) on this node; an action iff 0 <-> >0."""
    pr = Presence("eu")
    ids = ["alice", "alice", "bob", "carol", "bob"]  # tabs 0 and 1 are both alice
    peers = {i: peer(pr, str(i), ids[i]) for i in range(5)}
    model: dict[tuple[str, str], set[int]] = {}
    for op, i, c in steps:
        p = peers.get(i)
        if p is None:
            continue
        before = {k: len(v) for k, v in model.items()}
        if op == "join":
            got = join(pr, p, c)
            model.setdefault((c, p.client_id), set()).add(i)
        elif op == "leave":
            got = leave(pr, p, c)
            model.get((c, p.client_id), set()).discard(i)
        else:
            got = gone(pr, p)
            for members in model.values():
                members.discard(i)
            del peers[i]
        expected = set()
        for key in set(before) | set(model):
            was, now = before.get(key, 0), len(model.get(key, ()))
            if (was == 0) != (now == 0):
                expected.add(Member("app", key[0], key[1], now > 0))
        assert set(got) == expected and len(got) == len(expected)


# -- signature, schedules -------------------------------------------------------------------


def test_signature_format_and_verification() -> None:
    body = b'{"events":[]}'
    header = sign("s3cret", body, 1_700_000_000)
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify("s3cret", header, body, now=1_700_000_010)
    assert not verify("other", header, body, now=1_700_000_010)
    assert not verify("s3cret", header, body + b" ", now=1_700_000_010)
    assert not verify("s3cret", header, body, now=1_700_000_000 + 301)  # a replay, later
    assert not verify("s3cret", header.replace("t=1700000000", "t=1700000001"), body,
                      now=1_700_000_010)
    # Several v1 values (a secret being rotated): one match is enough.
    assert verify("s3cret", f"t=1700000000,v1={'0' * 64},v1={expected}", body,
                  now=1_700_000_000)
    for bad in ("", "t=abc,v1=00", f"v1={expected}", "t=1700000000"):
        assert not verify("s3cret", bad, body, now=1_700_000_000)


def test_backoff_doubles_is_jittered_and_capped() -> None:
    low = [backoff(n, 0.0) for n in range(1, 10)]
    high = [backoff(n, 0.999999) for n in range(1, 10)]
    assert low == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    assert [round(h, 3) for h in high] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff(10_000, 0.999999) <= BACKOFF_CAP


def test_what_is_retried() -> None:
    assert [s for s in (200, 204, 301, 400, 401, 404, 408, 409, 413, 429, 500, 502, 503)
            if retryable(s)] == [408, 429, 500, 502, 503]


def test_batch_due_full_or_one_window_after_the_first() -> None:
    cases = [  # queued, first queued at, now -> seconds until the batch goes
        (1, 10.0, 10.0, 1.0),
        (1, 10.0, 10.4, 0.6),
        (99, 10.0, 10.999, 0.001),
        (1, 10.0, 11.0, 0.0),
        (1, 10.0, 50.0, 0.0),  # older than the window (a batch was being retried)
        (100, 10.0, 10.0, 0.0),  # full
        (250, 10.0, 10.0, 0.0),
    ]
    for queued, first, now, due in cases:
        assert batch_due(queued, first, now) == pytest.approx(due), (queued, first, now)


def test_iso_ms() -> None:
    assert iso_ms(1_700_000_000.1234) == "2023-11-14T22:13:20.123Z"
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"


def test_event_json_has_the_fields_and_a_fresh_id_per_batch() -> None:
    e = Event("member_left", "app", "room", "alice", 1_700_000_000.5)
    one, two = e.json("eu"), e.json("eu")
    assert set(one) == {"id", "type", "app", "channel", "user_id", "mesh_id", "at"}
    assert one["id"] != two["id"]  # built once per batch: the batch keeps its ids
    assert {k: v for k, v in one.items() if k != "id"} == {
        "type": "member_left", "app": "app", "channel": "room", "user_id": "alice",
        "mesh_id": "eu", "at": "2023-11-14T22:13:20.500Z"}


# -- the queue bound --------------------------------------------------------------------------


@dataclass
class Drops:
    counted: dict[str, int] = field(default_factory=dict)

    def __call__(self, reason: str, n: int) -> None:
        self.counted[reason] = self.counted.get(reason, 0) + n


def sender(limit: int, drops: Drops) -> Sender:
    return Sender("https://user:pw@hooks.example:8443/in?token=x", "k", mesh_id="eu",
                  timeout=1.0, limit=limit, count_drop=drops)


def test_the_queue_is_bounded_drops_are_counted_and_logged_sparingly(
        caplog: pytest.LogCaptureFixture) -> None:
    drops = Drops()
    s = sender(3, drops)
    caplog.set_level(logging.WARNING, "prscd.webhooks")
    results = [s.put(Event("member_joined", "app", "room", f"u{i}", 0.0))
               for i in range(3 + 2 * DROP_LOG_EVERY)]
    assert results == [True] * 3 + [False] * 2 * DROP_LOG_EVERY
    assert s.queued == 3 and drops.counted == {"webhook_queue_full": 2 * DROP_LOG_EVERY}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines  # the first, the 1000th, the 2000th
    assert all("reason=webhook_queue_full" in line for line in lines)
    # Never the credentials, the path or the query of the URL.
    assert all("https://hooks.example:8443" in line and "pw" not in line
               and "token" not in line for line in lines)


def test_held_events_count_toward_the_bound() -> None:
    drops = Drops()
    s = sender(3, drops)
    s.held = lambda: 2
    assert s.put(Event("member_joined", "app", "room", "a", 0.0))
    assert not s.put(Event("member_joined", "app", "room", "b", 0.0))
    assert drops.counted == {"webhook_queue_full": 1}


# -- the grace window -------------------------------------------------------------------------


async def test_grace_back_within_it_releases_nothing_beyond_it_releases() -> None:
    released: list[tuple[str, str]] = []
    grace: Grace[str, str] = Grace(0.05, lambda k, v: released.append((k, v)))
    grace.hold("alice", "left-1")
    assert grace.cancel("alice")  # back within the grace: never left
    grace.hold("bob", "left-2")
    await wait_until(lambda: released, 2.0, "bob's release")
    # Release order is hold order: alice's, had it been kept, would have come first.
    assert released == [("bob", "left-2")] and len(grace) == 0
    assert not grace.cancel("bob")  # too late: the left went out


async def test_grace_holds_again_after_a_return_and_flush_releases_in_order() -> None:
    released: list[str] = []
    grace: Grace[str, str] = Grace(60.0, lambda k, v: released.append(v))
    grace.hold("a", "a1")
    grace.hold("b", "b1")
    grace.hold("a", "a2")  # left again: the newer one replaces it, at the end
    assert len(grace) == 2 and "a" in grace
    grace.flush()
    assert released == ["b1", "a2"] and len(grace) == 0


async def test_zero_grace_releases_at_once() -> None:
    released: list[str] = []
    Grace(0.0, lambda k, v: released.append(v)).hold("a", "v")
    assert released == ["v"]


def webhooks(grace: float = 60.0, query: Any = None) -> tuple[Webhooks, Presence]:
    presence = Presence("eu")
    settings = Settings.from_env({"WEBHOOK_URL": "http://127.0.0.1:9/in",
                                  "WEBHOOK_GRACE": str(grace)})
    return Webhooks(settings, node_id="eu-1", presence=presence, count_drop=Drops(),
                    query=query), presence


def queued(w: Webhooks) -> list[tuple[str, str | None]]:
    return [(e.type, e.user_id) for e in w.sender._queue]


async def test_member_events_through_the_grace_window() -> None:
    w, _ = webhooks(grace=60.0)
    w.member(Member("app", "room", "alice", True))
    w.member(Member("app", "room", "alice", False))
    w.member(Member("app", "room", "alice", True))  # back within the grace: nothing
    assert queued(w) == [("member_joined", "alice")] and len(w.grace) == 0
    w.member(Member("app", "room", "alice", False))
    assert len(w.grace) == 1
    w.grace.flush()  # as at the node's stop
    assert queued(w) == [("member_joined", "alice"), ("member_left", "alice")]


async def test_beyond_the_grace_left_then_joined() -> None:
    w, _ = webhooks(grace=0.05)
    w.member(Member("app", "room", "alice", True))
    w.member(Member("app", "room", "alice", False))
    await wait_until(lambda: len(queued(w)) == 2, 2.0, "the left after the grace")
    w.member(Member("app", "room", "alice", True))
    assert queued(w) == [("member_joined", "alice"), ("member_left", "alice"),
                         ("member_joined", "alice")]


async def test_a_member_released_after_presence_grace_is_not_held_again() -> None:
    w, _ = webhooks(grace=60.0)
    w.member(Member("app", "room", "alice", True))
    w.member(Member("app", "room", "alice", False, after_grace=True))
    assert queued(w) == [("member_joined", "alice"), ("member_left", "alice")]
    assert len(w.grace) == 0


# -- occupancy --------------------------------------------------------------------------------


def ans(members: int, since: float | None) -> dict[str, Any]:
    return {"members": members, "since": since}


@pytest.mark.parametrize(("since", "answers", "first"), [
    (10.0, {}, True),  # nobody else (or no mesh)
    (10.0, {"me": ans(1, 10.0)}, True),  # its own answer does not count
    (10.0, {"b": ans(0, None), "c": ans(0, None)}, True),  # the others are empty
    (10.0, {"b": ans(2, 9.0)}, False),  # held elsewhere since earlier
    (10.0, {"b": ans(2, 11.0)}, True),  # b came after us (it defers to us)
    (10.0, {"b": ans(1, 10.0)}, False),  # a tie: the smaller node id wins ("b" < "me")
    (10.0, {"z": ans(1, 10.0)}, True),  # a tie the other way
    (10.0, {"b": ans(1, 11.0), "c": ans(1, 9.5)}, False),
    # Nonsense answers are not holders (a node that answered badly counts as missing).
    (10.0, {"b": {"error": "x"}, "c": ans(1, None), "d": {"members": True, "since": 1.0},
            "e": {"members": "1", "since": 1.0}, "f": ans(1, float("nan"))}, True),
])
def test_occupied_first(since: float, answers: dict, first: bool) -> None:
    assert occupied("me", since, answers)[0] is first


def test_occupied_two_regions_at_the_same_instant_exactly_one_wins_both_name_its_period(
        ) -> None:
    answers = {"eu-1": ans(1, 100.0), "us-1": ans(1, 100.0)}
    assert [occupied(n, 100.0, answers) for n in ("eu-1", "us-1")] == [
        (True, (100.0, "eu-1")), (False, (100.0, "eu-1"))]
    answers = {"eu-1": ans(1, 100.002), "us-1": ans(1, 100.001)}
    assert [occupied(n, answers[n]["since"], answers) for n in ("eu-1", "us-1")] == [
        (False, (100.001, "us-1")), (True, (100.001, "us-1"))]


def test_a_later_holder_takes_the_period_over_from_the_first_holder_it_sees() -> None:
    # eu held the channel first, left; us (which took eu's period) holds it now.
    answers = {"us-1": {**ans(1, 105.0), "period": [100.0, "eu-1"]}, "ap-1": ans(0, None)}
    assert occupied("ap-1", 110.0, answers) == (False, (100.0, "eu-1"))
    # A nonsense period is not taken over: the holder's own (since, id) names it.
    answers["us-1"]["period"] = ["x", 1]
    assert occupied("ap-1", 110.0, answers) == (False, (105.0, "us-1"))


def test_channel_event_ids_are_the_same_for_the_same_period_everywhere() -> None:
    one = event_id("channel_vacated", "app", "room", (100.25, "eu-1"))
    assert one == event_id("channel_vacated", "app", "room", (100.25, "eu-1"))
    assert len({one, event_id("channel_occupied", "app", "room", (100.25, "eu-1")),
                event_id("channel_vacated", "app", "hall", (100.25, "eu-1")),
                event_id("channel_vacated", "app", "room", (100.26, "eu-1")),
                event_id("channel_vacated", "app", "room", (100.25, "us-1"))}) == 5


@pytest.mark.parametrize(("answers", "last"), [
    ({}, True),
    ({"me": ans(0, None)}, True),
    ({"me": ans(3, 1.0)}, True),  # its own answer does not count (it may have a new member)
    ({"b": ans(0, None)}, True),
    ({"b": ans(1, 5.0)}, False),
    ({"b": ans(0, None), "c": ans(1, 5.0)}, False),
])
def test_vacated_last(answers: dict, last: bool) -> None:
    assert vacated_last("me", answers) is last


@dataclass
class FakeGathered:
    answers: dict[str, dict[str, Any]]
    answered: list[str]
    missing: list[str]


class FakeQuery:
    """mesh/query.py's API, answering for scripted other nodes (the real one is used by
    tests/mesh/test_webhooks_mesh.py)."""

    def __init__(self, me: str, others: dict[str, dict[str, dict[str, Any]]]) -> None:
        self.me, self.others = me, others  # channel -> node -> answer
        self.handlers: dict[str, Any] = {}
        self.asked: list[dict[str, Any]] = []

    def handle(self, kind: str, answer: Any) -> None:
        self.handlers[kind] = answer

    async def ask(self, kind: str, body: dict[str, Any]) -> FakeGathered:
        self.asked.append(body)
        await asyncio.sleep(0)
        answers = {self.me: self.handlers[kind](body), **self.others.get(body["channel"], {})}
        return FakeGathered(answers, list(answers), [])


async def test_occupancy_asks_and_decides_in_order_per_channel() -> None:
    events: list[tuple[str, str]] = []
    presence = Presence("eu")
    # us-1 is not in "room"; it holds "hall" from before.
    query = FakeQuery("eu-1", {"room": {"us-1": ans(0, None)}, "hall": {"us-1": ans(1, 50.0)}})
    occ = Occupancy("eu-1", presence, query,
                    emit=lambda k, a, c, at, id_: events.append((k, c)),
                    grace=0.0, limit=100, count_drop=Drops(), timeout=1.0)
    occ.start()
    occ.changed("app", "room", True, 100.0)
    occ.changed("app", "room", False, 101.0)
    occ.changed("app", "hall", True, 102.0)
    await wait_until(lambda: occ.pending == 0, 2.0, "the decisions")
    assert events == [("channel_occupied", "room"), ("channel_vacated", "room")]
    # One decision at a time per channel; channels ask side by side.
    assert sorted(b["channel"] for b in query.asked) == ["hall", "room", "room"]


async def test_occupancy_answers_count_a_vacancy_in_its_grace_as_a_member() -> None:
    presence = Presence("eu")
    occ = Occupancy("eu-1", presence, None, emit=lambda *a: None, grace=60.0, limit=100,
                    count_drop=Drops(), timeout=1.0)
    alice = peer(presence, "1", "alice")
    join(presence, alice)
    occ.changed("app", "room", True, 100.0)
    await wait_until(lambda: occ.pending == 0, 2.0, "the decision")
    here = {**ans(1, 100.0), "period": [100.0, "eu-1"]}
    assert occ.answer({"app": "app", "channel": "room"}) == here
    gone(presence, alice)
    occ.changed("app", "room", False, 101.0)
    assert occ.answer({"app": "app", "channel": "room"}) == here  # in its grace
    occ.changed("app", "room", True, 102.0)  # back: still occupied since 100
    assert occ.pending == 0  # no new 0 -> 1 to decide
    assert occ.answer({"app": "app", "channel": "nope"}) == {**ans(0, None), "period": None}
    assert "error" in occ.answer({"app": 1})
    await occ.aclose()


async def test_occupancy_decisions_are_bounded() -> None:
    drops = Drops()
    never = asyncio.Event()

    class Stuck(FakeQuery):
        async def ask(self, kind: str, body: dict[str, Any]) -> FakeGathered:
            await never.wait()
            raise AssertionError("unreachable")

    occ = Occupancy("eu-1", Presence("eu"), Stuck("eu-1", {}), emit=lambda *a: None,
                    grace=0.0, limit=3, count_drop=drops, timeout=60.0)
    for i in range(5):
        occ.changed("app", f"c{i}", True, 1.0)
    assert occ.pending == 3 and drops.counted == {"webhook_occupancy_full": 2}
    await occ.aclose()  # STOP_DECIDE later: the three undone decisions are counted
    assert drops.counted["webhook_undecided"] == 3 and occ.pending == 0
