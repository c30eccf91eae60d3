"""Subject tokens for client-chosen names: safe, distinct, never widening a subscription."""

from __future__ import annotations

from mesh.bridge import TAG_PEER, channel_subject, event_subject, token
from mesh.bus import subject_matches
from mesh.liveness import ALL_NODES, heartbeat_subject

NAMES = [">", "*", "a.b", "a b", "a\tb", "ünïcødé", "😀", "room", "ROOM", "a-b_c", "~x",
         "a.>", "*.*", "", ".", "..", "$SYS", "x" * 128]


def test_tokens_are_single_safe_tokens_and_distinct() -> None:
    tokens = [token(n) for n in NAMES if n]
    assert len(set(tokens)) == len(tokens)
    for t in tokens:
        assert t and not any(ch in t for ch in ".*> \t\r\n")
        assert t.isascii()


def test_a_channel_subscription_matches_only_its_own_channel() -> None:
    names = [n for n in NAMES if n]
    for sub_name in names:
        pattern = channel_subject("app", sub_name)
        for pub_name in names:
            subject = event_subject("app", pub_name, TAG_PEER, "eu", "eu-1")
            assert subject_matches(pattern, subject) == (sub_name == pub_name), (
                sub_name, pub_name)


def test_heartbeats_never_meet_channel_traffic() -> None:
    for name in ("nodes", "prscd-sys", "m"):
        assert not subject_matches(channel_subject("prscd-sys", name),
                                   heartbeat_subject("m", "m-1"))
        assert not subject_matches(ALL_NODES, event_subject(name, name, TAG_PEER, "m", "n"))
