"""The server API's pure parts: local answers from the presence rules, msgpack -> JSON,
names and routes, the publish body, and how answers of several nodes merge."""

from __future__ import annotations

import datetime as dt
import json

import msgpack
import pytest

from mesh.query import Gathered
from node import answers
from node.answers import state_json, to_json
from node.api import ApiError, check_app, check_channel, check_id, parse_publish, route
from node.presence import Peer, Presence
from node.protocol import Signalling

pytestmark = pytest.mark.unit


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def make(presence: Presence, sid: str, client_id: str, app: str = "app") -> Peer:
    peer = Peer(sid=sid, client_id=client_id, app=app, transport="test")
    presence.connect(peer)
    return peer


def join(presence: Presence, peer: Peer, channel: str = "room", **state: object) -> None:
    pl = pack({"id": peer.client_id, **state}) if state else None
    presence.handle(peer, Signalling(t="control", op="channel_join", c=channel, pl=pl))


def set_state(presence: Presence, peer: Peer, channel: str = "room", **state: object) -> None:
    presence.handle(peer, Signalling(t="control", op="peer_state", c=channel,
                                     pl=pack({"id": peer.client_id, **state})))


# -- local answers ------------------------------------------------------------------------


def test_members_count_an_id_once_per_node_with_its_connections_and_last_state() -> None:
    pr = Presence("eu", dedupe_state=True)
    a1, a2, b = make(pr, "1", "alice"), make(pr, "2", "alice"), make(pr, "3", "bob")
    join(pr, a1, color="red")
    join(pr, b, color="blue")
    join(pr, a2, color="green")  # the second tab joined last: its state is the latest
    assert pr.members("app", "room") == [
        {"id": "alice", "state": pack({"id": "alice", "color": "green"}), "connections": 2},
        {"id": "bob", "state": pack({"id": "bob", "color": "blue"}), "connections": 1},
    ]
    set_state(pr, a1, color="pink")  # now the first tab sent the latest
    assert pr.members("app", "room")[0]["state"] == pack({"id": "alice", "color": "pink"})
    assert pr.channels("app") == [{"name": "room", "members": 2}]
    assert pr.channels("other") == [] and pr.members("app", "nope") == []


def test_state_follows_the_channel_and_goes_with_the_peer() -> None:
    pr = Presence("eu")
    a = make(pr, "1", "alice")
    join(pr, a, "room", n=1)
    join(pr, a, "lobby")  # a join without pl: no state yet
    assert pr.members("app", "lobby") == [{"id": "alice", "state": None, "connections": 1}]
    set_state(pr, a, "lobby", n=2)
    assert a.states == {"room": pack({"id": "alice", "n": 1}), "lobby": pack({"id": "alice", "n": 2})}
    pr.handle(a, Signalling(t="control", op="peer_offline", c="room"))
    assert set(a.states) == {"lobby"} and set(a.state_seq) == {"lobby"}
    # A peer_state for a channel it left is dropped, and stores nothing.
    set_state(pr, a, "room", n=3)
    assert "room" not in a.states
    pr.disconnect(a)
    assert a.states == {} and pr.members("app", "lobby") == []


def test_a_held_peer_is_still_a_member_until_released() -> None:
    """Within PRESENCE_GRACE a vanished peer is still on everyone's screen: the API agrees."""
    pr = Presence("eu")
    a, b = make(pr, "1", "alice"), make(pr, "2", "bob")
    join(pr, a, color="red")
    join(pr, b)
    pr.hold(a)
    assert [m["id"] for m in pr.members("app", "room")] == ["alice", "bob"]
    assert pr.members("app", "room")[0]["state"] == pack({"id": "alice", "color": "red"})
    assert pr.channels("app") == [{"name": "room", "members": 2}]
    pr.release(a, "room")
    assert [m["id"] for m in pr.members("app", "room")] == ["bob"]
    assert pr.channels("app") == [{"name": "room", "members": 1}]
    pr.silence(b)  # silent: held, and its connection still in the channel: one connection
    assert pr.members("app", "room") == [{"id": "bob", "state": None, "connections": 1}]
    assert pr.channels("app") == [{"name": "room", "members": 1}]


def test_user_counts_connections_in_a_channel_or_not_per_app() -> None:
    pr = Presence("eu")
    a1, a2 = make(pr, "1", "alice"), make(pr, "2", "alice")
    make(pr, "3", "alice", app="other")
    join(pr, a1, "room")
    join(pr, a2, "lobby")
    join(pr, a2, "room")
    assert pr.user("app", "alice") == {"channels": ["lobby", "room"], "connections": 2}
    assert pr.user("other", "alice") == {"channels": [], "connections": 1}
    assert pr.user("app", "bob") == {"channels": [], "connections": 0}


# -- msgpack -> JSON ----------------------------------------------------------------------


def test_to_json_bytes_keys_floats_and_extensions() -> None:
    value = {"b": b"\x00\xff", 1: [1.5, float("nan"), float("inf")], "n": None, None: "t",
             False: "f", "e": msgpack.ExtType(5, b"ab")}
    assert to_json(value) == {"b": "AP8=", "1": [1.5, None, None], "n": None, "null": "t",
                              "false": "f", "e": {"ext": 5, "base64": "YWI="}}
    json.dumps(to_json(value), allow_nan=False)  # strictly valid JSON


def test_a_msgpack_timestamp_becomes_iso_8601() -> None:
    when = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
    pl = pack({"id": "a", "at": msgpack.Timestamp.from_datetime(when),
               "s": msgpack.Timestamp(0, 0), "ns": msgpack.Timestamp(1, 5)})
    assert state_json(pl) == {"id": "a", "at": "2024-05-06T07:08:09.123456Z",
                              "s": "1970-01-01T00:00:00Z", "ns": "1970-01-01T00:00:01.000000005Z"}
    far = msgpack.Timestamp(2**40, 7)  # past year 9999: no ISO form
    assert to_json(far) == {"seconds": 2**40, "nanoseconds": 7}


def test_state_json_of_nothing_and_of_garbage() -> None:
    assert state_json(None) is None
    assert state_json(b"\xc1") == {"base64": "wQ=="}  # never fails the whole answer


@pytest.mark.parametrize("state", [
    None, {"id": "a", "name": "Ä"}, {"b": b"\x00", "t": msgpack.Timestamp(1, 5)},
    {"e": msgpack.ExtType(3, b"z"), "nested": [{"f": 1.5}]},
    {"nan": float("nan"), 7: "int key"}, {b"bin": "binary key"},
])
def test_member_text_is_the_entry_with_state_json(state: object) -> None:
    pl = None if state is None else pack(state)
    text = answers.member_text("alice", pl, "eu", "eu-1", 2)
    assert json.loads(text) == {"id": "alice", "state": state_json(pl), "mesh_id": "eu",
                                "node": "eu-1", "connections": 2}
    assert text.isascii()


# -- names and routes ---------------------------------------------------------------------


def test_routes() -> None:
    assert route("GET", "/v1/apps/app/channels") == answers_route("channels", "app")
    assert route("GET", "/v1/apps/app/channels/room/members?x=1") == answers_route(
        "members", "app", channel="room")
    assert route("GET", "/v1/apps/app/users/alice") == answers_route("user", "app",
                                                                     client_id="alice")
    assert route("POST", "/v1/apps/app/channels/room/publish") == answers_route(
        "publish", "app", channel="room")


def answers_route(kind: str, app: str, **kw: str) -> object:
    from node.api import Route

    return Route(kind, app, **kw)


def test_path_parts_are_percent_decoded_one_by_one() -> None:
    r = route("GET", "/v1/apps/my%20app/channels/a%2Fb%20%C3%BC+/members")
    assert (r.app, r.channel) == ("my app", "a/b ü+")
    assert route("GET", "/v1/apps/a/users/%E2%9C%93").client_id == "✓"


@pytest.mark.parametrize("method,target,status,words", [
    ("GET", "/v1/apps/app", 404, "no such path"),
    ("GET", "/v1/apps/app/channels/", 404, "no such path"),
    ("GET", "/v1/apps/app/channels/room", 404, "no such path"),
    ("GET", "/v2/apps/app/channels", 404, "no such path"),
    ("GET", "//host/v1/apps/app/channels", 404, "no such path"),
    ("GET", "https://host/v1/apps/app/channels", 404, "no such path"),
    ("POST", "/v1/apps/app/channels", 405, "use GET"),
    ("GET", "/v1/apps/app/channels/room/publish", 405, "use POST"),
    ("DELETE", "/v1/apps/app/users/a", 405, "use GET"),
    ("GET", "/v1/apps//channels", 400, "app must not be empty"),
    ("GET", "/v1/apps/a%0Ab/channels", 400, "app contains control characters"),
    ("GET", "/v1/apps/" + "a" * 129 + "/channels", 400, "app longer than 128 bytes"),
    ("GET", "/v1/apps/a/channels//members", 400, "channel must not be empty"),
    ("GET", "/v1/apps/a/channels/" + "%C3%BC" * 65 + "/members", 400, "channel longer than 128"),
    ("GET", "/v1/apps/a/channels/%FF/members", 400, "channel is not UTF-8"),
    ("GET", "/v1/apps/a/users/%ED%A0%80", 400, "id is not UTF-8"),
    ("GET", "/v1/apps/a/users/al%09ice", 400, "id contains control characters"),
    ("GET", "/v1/apps/a/users/" + "x" * 129, 400, "id longer than 128 bytes"),
])
def test_bad_targets(method: str, target: str, status: int, words: str) -> None:
    with pytest.raises(ApiError) as err:
        route(method, target)
    assert err.value.status == status and words in err.value.error, err.value.error
    if status == 405:
        assert err.value.headers["Allow"] in ("GET", "POST")


def test_names_at_their_limits() -> None:
    assert check_channel("ü" * 64) == "ü" * 64  # 128 bytes
    with pytest.raises(ApiError, match="control characters"):  # as the wire protocol's c
        check_channel("tab\there")
    assert check_app("a" * 128) and check_id("x" * 128)
    with pytest.raises(ApiError):
        check_channel("\ud800")


# -- the publish body ---------------------------------------------------------------------


def test_publish_body_becomes_backend_data() -> None:
    sig = parse_publish(b'{"event": "alert", "data": {"level": 2, "text": "\\u00fc"}}', "app",
                        "room")
    assert (sig.t, sig.c, sig.p, sig.app) == ("data", "room", "backend", "app")
    assert msgpack.unpackb(sig.pl) == {"event": "alert", "data": '{"level":2,"text":"ü"}'}
    no_data = parse_publish(b'{"event": "ping"}', "app", "room")
    assert msgpack.unpackb(no_data.pl)["data"] == "null"


@pytest.mark.parametrize("body,words", [
    (b"\xff", "not UTF-8"),
    (b"{", "not JSON"),
    (b'{"event": "e", "data": NaN}', "not JSON"),
    (b'{"event": "e", "data": -Infinity}', "not JSON"),
    (b"[1]", "must be a JSON object"),
    (b'{"event": "e", "payload": 1}', "unknown key 'payload'"),
    (b'{"data": 1}', "event must be a non-empty string"),
    (b'{"event": ""}', "event must be a non-empty string"),
    (b'{"event": 5}', "event must be a non-empty string"),
    (b'{"event": "' + b"e" * 129 + b'"}', "event longer than 128 bytes"),
    (b'{"event": "e", "data": "\\ud800"}', "lone surrogate"),
    (b'{"event": "\\udc00"}', "lone surrogate"),
    (b'{"event": "e", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
])
def test_bad_publish_bodies(body: bytes, words: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_publish(body, "app", "room")
    assert err.value.status == 400 and words in err.value.error, err.value.error


# -- merging answers ----------------------------------------------------------------------


def gathered(*nodes: tuple[str, dict], missing: tuple[str, ...] = ()) -> Gathered:
    return Gathered(dict(nodes), [n for n, _ in nodes], list(missing))


def rows(mesh_id: str, node: str, *members: tuple[str, int, dict]) -> dict:
    return {"mesh_id": mesh_id, "app": True, "ids": [m[0] for m in members],
            "members": [answers.member_text(m[0], pack(m[2]) if m[2] else None, mesh_id, node,
                                            m[1]) for m in members]}


def test_members_merge_one_entry_per_id_and_node() -> None:
    g = gathered(
        ("us-1", rows("us", "us-1", ("alice", 1, {"n": 2}), ("bob", 1, {}))),
        ("eu-1", rows("eu", "eu-1", ("alice", 2, {"n": 1}))),
        ("ap-1", {"error": "members failed: KeyError"}),
        missing=("sa-1",))
    assert [json.loads(text) for text in answers.merge_members(g)] == [
        {"id": "alice", "state": {"n": 1}, "mesh_id": "eu", "node": "eu-1", "connections": 2},
        {"id": "alice", "state": {"n": 2}, "mesh_id": "us", "node": "us-1", "connections": 1},
        {"id": "bob", "state": None, "mesh_id": "us", "node": "us-1", "connections": 1},
    ]
    # A node that answered with an error is not merged: it is listed as missing.
    assert answers.nodes_view(g) == {"answered": ["us-1", "eu-1"], "missing": ["ap-1", "sa-1"]}
    for bad in ({"ids": ["alice"], "members": [5]}, {"ids": ["a", "b"], "members": ["{}"]}):
        with pytest.raises(ValueError, match="malformed members answer from eu-1"):
            answers.merge_members(gathered(("eu-1", {"mesh_id": "eu", "app": True, **bad})))


def test_channels_and_user_merge() -> None:
    g = gathered(
        ("eu-1", {"mesh_id": "eu", "app": True, "channels": [{"name": "a", "members": 2}],
                  "connections": 2}),
        ("us-1", {"mesh_id": "us", "app": True, "channels": [{"name": "a", "members": 1},
                                                              {"name": "b", "members": 1}],
                  "connections": 0}))
    assert answers.merge_channels(g) == [{"name": "a", "members": 3}, {"name": "b", "members": 1}]
    u = gathered(("eu-1", {"mesh_id": "eu", "app": True, "channels": ["a"], "connections": 2}),
                 ("us-1", {"mesh_id": "us", "app": False, "channels": [], "connections": 0}))
    assert answers.merge_user(u, "alice") == {"id": "alice", "online": True, "connections": 2,
                                              "channels": ["a"], "mesh_ids": ["eu"]}
    nobody = gathered(("eu-1", {"mesh_id": "eu", "app": False, "channels": [], "connections": 0}))
    assert not answers.app_known(nobody) and answers.merge_user(nobody, "x")["online"] is False
