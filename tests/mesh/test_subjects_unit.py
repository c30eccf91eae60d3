"""Subject tokens for client-chosen names: safe, distinct, never widening a subscription."""

from __future__ import annotations

import pytest

from mesh.bridge import TAG_PEER, channel_subject, event_subject, token
from mesh.bus import subject_matches
from mesh.liveness import ALL_NODES, heartbeat_subject

pytestmark = pytest.mark.unit

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


def test_observe_lines() -> None:
    import json

    from mesh.backend import backend_signal, describe, observe_subject
    from mesh.bridge import TAG_BACKEND, pack
    from mesh.bus import BusMessage

    hb = {"node": "eu-1", "mesh": "eu", "state": "alive", "peers": 3, "channels": 2,
          "url": "https://eu/v1"}
    line = describe(BusMessage(heartbeat_subject("eu", "eu-1"), json.dumps(hb).encode()))
    assert line == ("prscd-sys.nodes.eu.eu-1 mesh=eu node=eu-1 op=heartbeat peers=3 "
                    "channels=2 url=https://eu/v1")
    sig = backend_signal("app", "a.b", "alert", {"x": 1})
    subject = event_subject("app", "a.b", TAG_BACKEND, "backend", "backend-1")
    line = describe(BusMessage(subject, pack(sig, "backend-1", TAG_BACKEND)))
    assert line == (f"{subject} mesh=backend node=backend-1 op=data tag=0x21 app=app "
                    "channel='a.b' p='backend' event=alert data={\"x\":1}")
    assert "malformed" in describe(BusMessage("prscd.a.b.20.m.n", b"\x01"))
    assert observe_subject(None, None) == "prscd.>"
    assert observe_subject("app", None) == "prscd.app.>"
    assert observe_subject(None, "a.b") == "prscd.*.~mexge.>"
