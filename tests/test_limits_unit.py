"""node/limits.py on a fake clock: the token bucket, flood detection, credit for the
answers the server asks for, channel and connection limits."""

from __future__ import annotations

import msgpack
import pytest

from node.config import Settings
from node.limits import DROP, OK, Guard
from node.presence import Close, Peer, Presence
from node.protocol import Fault, Signalling

pytestmark = pytest.mark.unit

DATA = Signalling(t="data", c="room", pl=msgpack.packb({"event": "e", "data": "1"}))
STATE = Signalling(t="control", op="peer_state", c="room", pl=msgpack.packb({}))
ONLINE = Signalling(t="control", op="peer_online", c="room")


def guard(**env: str) -> tuple[Guard, Presence]:
    presence = Presence("m")
    return Guard(Settings.from_env(env), presence), presence


def joined(presence: Presence, guard_: Guard, sid: str, channel: str = "room") -> Peer:
    peer = Peer(sid=sid, client_id=sid, app="app", transport="t")
    presence.connect(peer)
    guard_.opened(peer, -1000.0)
    join = Signalling(t="control", op="channel_join", c=channel)
    # Long before the test's clock starts: the bucket is full again at 0. The ack credits
    # one announcement.
    assert guard_.check(peer, join, -1000.0) == OK
    presence.handle(peer, join)
    return peer


def test_defaults() -> None:
    s = Settings.from_env({})
    assert (s.rate_limit, s.rate_burst, s.max_channels_per_peer, s.max_peers_per_channel,
            s.max_connections, s.handshake_timeout, s.http_max_line, s.http_max_headers) == (
        200, 400, 64, 1000, 10000, 10, 8192, 64)


def test_bucket_allows_the_rate_and_drops_the_excess() -> None:
    g, p = guard(RATE_LIMIT="10", RATE_BURST="20")
    peer = joined(p, g, "a")
    verdicts = [g.check(peer, DATA, 0.0) for _ in range(25)]
    assert verdicts == [OK] * 20 + [DROP] * 5  # the burst, then nothing
    assert g.check(peer, DATA, 0.5) == OK  # 5 tokens came back in 0.5 s
    # A steady 10/s never drops.
    t = 10.0
    for _ in range(100):
        t += 0.1
        assert g.check(peer, DATA, t) == OK


def test_over_twice_the_rate_for_a_while_is_a_flood_under_twice_is_not() -> None:
    g, p = guard(RATE_LIMIT="10", RATE_BURST="20")
    peer = joined(p, g, "a")
    t, results = 0.0, []
    for _ in range(600):  # 30/s for 20 s
        t += 1 / 30
        results.append(g.check(peer, DATA, t))
    flood = next(i for i, r in enumerate(results) if isinstance(r, Close))
    assert isinstance(results[flood], Close) and results[flood].fault.code == 1008
    assert results[flood].fault is Fault.RATE_FLOOD and results[flood].peer is peer
    assert "10/s" in results[flood].reason
    assert 1.5 < flood / 30 < 4  # about burst / (30 - 2*10) = 2 s after the burst ran out
    g2, p2 = guard(RATE_LIMIT="10", RATE_BURST="20")
    peer2 = joined(p2, g2, "b")
    t, kinds = 0.0, set()
    for _ in range(600):  # 18/s: excess dropped, never closed
        t += 1 / 18
        kinds.add(type(g2.check(peer2, DATA, t)))
    assert Close not in kinds and kinds == {int}


def test_answers_to_peer_online_are_credited_but_cannot_bounce() -> None:
    g, p = guard(RATE_LIMIT="1", RATE_BURST="2")
    peer = joined(p, g, "a")
    g.asked_state([peer] * 50)  # fifty peer_online delivered: fifty answers owed
    assert [g.check(peer, STATE, 0.0) for _ in range(50)] == [OK] * 50
    # Credit for peer_online comes from acks only: the join's one, then the bucket's two.
    assert [g.check(peer, ONLINE, 0.0) for _ in range(4)] == [OK, OK, OK, DROP]
    g.asked_state([peer] * 5)
    assert g.check(peer, ONLINE, 0.0) == DROP
    # A join ack credits one peer_online and one peer_state per channel.
    g.asked_announce(peer)
    assert g.check(peer, ONLINE, 0.0) == OK
    # Credit is capped.
    g.asked_state([peer] * 100_000)
    owed = sum(g.check(peer, STATE, 0.0) == OK for _ in range(10_000))
    assert owed == g.credit_cap


def test_channels_per_peer_and_peers_per_channel() -> None:
    g, p = guard(MAX_CHANNELS_PER_PEER="2", MAX_PEERS_PER_CHANNEL="3", RATE_LIMIT="0")
    a = joined(p, g, "a", "one")
    p.handle(a, Signalling(t="control", op="channel_join", c="two"))
    third = Signalling(t="control", op="channel_join", c="three")
    refusal = g.check(a, third, 0.0)
    assert isinstance(refusal, Close) and refusal.fault.code == 4008
    assert refusal.fault.counter == "too_many_channels" and "at most 2" in refusal.reason
    assert g.check(a, Signalling(t="control", op="channel_join", c="two"), 0.0) == OK
    for sid in ("b", "c"):
        joined(p, g, sid, "one")
    d = Peer(sid="d", client_id="d", app="app", transport="t")
    p.connect(d)
    full = g.check(d, Signalling(t="control", op="channel_join", c="one"), 0.0)
    assert isinstance(full, Close) and full.fault.counter == "channel_full"
    other_app = Peer(sid="e", client_id="e", app="other", transport="t")
    assert g.check(other_app, Signalling(t="control", op="channel_join", c="one"), 0.0) == OK


def test_connection_limit() -> None:
    g, p = guard(MAX_CONNECTIONS="2")
    assert g.admit() == ""
    joined(p, g, "a")
    joined(p, g, "b")
    assert "2 connections" in g.admit()
    unlimited, p2 = guard(MAX_CONNECTIONS="0")
    for sid in "abc":
        joined(p2, unlimited, sid)
    assert unlimited.admit() == ""


def test_a_write_backlog_over_the_limit_closes_the_peer_as_a_slow_reader() -> None:
    g, p = guard(WRITE_BUFFER_LIMIT="1000")
    peer = joined(p, g, "a")
    assert g.backlog(peer, 1000) is None
    close = g.backlog(peer, 1001)
    assert isinstance(close, Close) and close.peer is peer
    assert close.fault is Fault.SLOW_READER and close.fault.code == 1008
    assert close.reason == "slow reader: 1001 bytes queued"
    off, q = guard(WRITE_BUFFER_LIMIT="0")
    assert off.backlog(joined(q, off, "b"), 10**9) is None
