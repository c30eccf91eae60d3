"""The server API on one node: every endpoint and every error, bearer keys, the OpenAPI
document (every answer below is checked against it), publish reaching a real peer."""

from __future__ import annotations

import json
import logging
from typing import Any

import msgpack
import pytest
from jsonschema import Draft202012Validator
from websockets.asyncio.client import connect

from tests.api_helpers import DOC, Api, raw_http
from tests.conftest import NodeFactory, RunningNode
from tests.helpers import barrier, control, join_frame, joined, pack, recv
from tests.mesh_helpers import port_open

KEYS = "key-one,key-two"


async def api_node(node_factory: NodeFactory, **env: Any) -> tuple[RunningNode, Api]:
    node = await node_factory(API_KEYS=KEYS, API_PORT="0", **env)
    assert node.app.api_port is not None
    return node, Api(node.app.api_port, "key-two", tls=node.node.settings.tls)


async def test_channels_members_and_users(node_factory: NodeFactory) -> None:
    node, api = await api_node(node_factory)
    a1 = await joined(node, "room", "alice")
    a2 = await joined(node, "room", "alice")  # a second tab
    b = await joined(node, "room", "bob")
    await joined(node, "a/b c", "bob")
    await a2.send(control("peer_state", "room", pack({"id": "alice", "x": 1, "blob": b"\x01"})))
    assert (await recv(b))["op"] == "peer_state"  # handled: bob got it

    status, body = await api.get("/v1/apps/default/channels")
    assert status == 200
    me = node.node.node_id
    assert body == {"channels": [{"name": "a/b c", "members": 1}, {"name": "room", "members": 2}],
                    "nodes": {"answered": [me], "missing": []}}
    status, body = await api.get("/v1/apps/default/channels/room/members")
    assert status == 200
    assert body["members"] == [
        {"id": "alice", "state": {"id": "alice", "x": 1, "blob": "AQ=="}, "mesh_id": "local",
         "node": me, "connections": 2},
        {"id": "bob", "state": {"id": "bob"}, "mesh_id": "local", "node": me, "connections": 1},
    ]
    # Percent-encoded names: '/' and ' ' inside a channel name.
    status, body = await api.get("/v1/apps/default/channels/a%2Fb%20c/members")
    assert status == 200 and [m["id"] for m in body["members"]] == ["bob"]

    status, body = await api.get("/v1/apps/default/users/alice")
    assert (status, body["online"], body["connections"], body["channels"], body["mesh_ids"]) == (
        200, True, 2, ["room"], ["local"])
    status, body = await api.get("/v1/apps/default/users/bob")
    assert body["channels"] == ["a/b c", "room"]
    status, body = await api.get("/v1/apps/default/users/carol")
    assert (status, body["online"], body["channels"], body["mesh_ids"]) == (200, False, [], [])

    await a1.close()
    await a2.close()
    status, body = await api.get("/v1/apps/default/users/alice")
    assert body["online"] is False  # gone from the answers once closed


async def test_unknown_app_and_channel_are_404_and_say_so(node_factory: NodeFactory) -> None:
    node, api = await api_node(node_factory)
    await joined(node, "room", "alice")
    status, body = await api.get("/v1/apps/nope/channels")
    assert status == 404
    assert body["error"] == "unknown app 'nope': no member on any of the 1 nodes that answered"
    assert body["nodes"]["answered"] == [node.node.node_id]
    status, body = await api.get("/v1/apps/default/channels/empty/members")
    assert status == 404 and body["error"].startswith("unknown channel 'empty': no member")
    status, body = await api.get("/v1/apps/nope/channels/room/members")
    assert status == 404 and body["error"].startswith("unknown app 'nope'")
    status, body = await api.get("/v1/apps/nope/users/alice")
    assert status == 404 and body["error"].startswith("unknown app 'nope'")
    status, body = await api.post("/v1/apps/default/channels/empty/publish", {"event": "e"})
    assert status == 404 and body["error"].startswith("unknown channel 'empty'")


async def test_publish_reaches_every_local_peer_once_as_data(node_factory: NodeFactory) -> None:
    node, api = await api_node(node_factory)
    a = await joined(node, "room", "alice")
    b = await joined(node, "room", "bob")
    other = await joined(node, "elsewhere", "carol")
    status, body = await api.post("/v1/apps/default/channels/room/publish",
                                  {"event": "alert", "data": {"level": 2, "ok": [True, None]}})
    assert (status, body) == (202, {"nodes": 1})
    for ws in (a, b):
        frame = await recv(ws)
        assert (frame["t"], frame["c"], frame["p"]) == ("data", "room", "backend")
        pl = msgpack.unpackb(frame["pl"])
        assert pl["event"] == "alert" and json.loads(pl["data"]) == {"level": 2, "ok": [True, None]}
    await barrier(a, b, "room")  # nothing else (no second copy) came before the marker
    await barrier(b, a, "room")
    await barrier(await joined(node, "elsewhere", "dave"), other, "elsewhere")
    assert node.node.source.published >= 1  # handed to the mesh too (the bus is embedded)


async def test_bearer_keys(node_factory: NodeFactory, caplog: pytest.LogCaptureFixture) -> None:
    node, api = await api_node(node_factory)
    await joined(node, "room", "alice")
    caplog.set_level(logging.INFO)
    for key, headers in ((None, {}), ("wrong", {}), ("key-one-and-more", {}),
                         (None, {"Authorization": "Basic a2V5LW9uZQ=="}),
                         (None, {"Authorization": "key-one"}), (None, {"Authorization": "Bearer "})):
        status, body, got = await api.call("GET", "/v1/apps/default/channels", key=key,
                                           headers=headers)
        assert status == 401, (key, headers)
        assert got["WWW-Authenticate"] == 'Bearer realm="prscd"'
        assert body["error"] in ("missing bearer key (Authorization: Bearer <key>)",
                                 "bearer key not accepted")
    # Before anything else: an unknown path or a wrong method says 401 too, not 404 / 405.
    assert (await api.get("/nothing", key=None))[0] == 401
    assert (await api.post("/v1/apps/default/channels", key="wrong"))[0] == 401
    assert (await api.get("/v1/apps/default/channels", key="key-one"))[0] == 200
    assert (await api.get("/v1/apps/default/channels", key="key-two"))[0] == 200
    assert node.node.presence.dropped["api_unauthorized"] == 8
    assert "wrong" not in caplog.text and "key-one" not in caplog.text


async def test_other_paths_and_methods(node_factory: NodeFactory) -> None:
    node, api = await api_node(node_factory)
    for path in ("/", "/health", "/v1/apps/default", "/v1/apps/default/channels/room",
                 "/v1/apps/default/channels/", "/v1/apps/default/users/a/b"):
        status, body = await api.get(path)
        assert status == 404 and body["error"].startswith("no such path"), path
    status, body, headers = await api.call("DELETE", "/v1/apps/default/users/alice")
    assert (status, headers["Allow"]) == (405, "GET")
    status, body, headers = await api.call("GET", "/v1/apps/default/channels/room/publish")
    assert (status, headers["Allow"], body["error"]) == (405, "POST", "GET not allowed here: use POST")
    status, body, headers = await api.call("PUT", "/v1/apps/default/channels")
    assert status == 405
    # A target the client library would normalise: sent as it is.
    port = node.app.api_port
    assert port is not None
    status, headers, body = await raw_http(
        port, b"GET //host/v1/apps/default/channels HTTP/1.1\r\nHost: x\r\n"
              b"Authorization: Bearer key-one\r\nConnection: close\r\n\r\n")
    assert status == 404 and headers["X-Prscd-MeshID"] == "local"


@pytest.mark.parametrize("path,words", [
    ("/v1/apps/%FF/channels", "app is not UTF-8 once percent-decoded"),
    ("/v1/apps/a%00/channels", "app contains control characters (U+0000)"),
    ("/v1/apps/default/channels/" + "c" * 129 + "/members", "channel longer than 128 bytes"),
    ("/v1/apps/default/users/al%0Aice", "id contains control characters (U+000A)"),
    ("/v1/apps/default/users/" + "%C3%BC" * 65, "id longer than 128 bytes"),
])
async def test_bad_names_are_400(node_factory: NodeFactory, path: str, words: str) -> None:
    _, api = await api_node(node_factory)
    status, body = await api.get(path)
    assert (status, body["error"]) == (400, words)


async def test_bad_publish_bodies(node_factory: NodeFactory) -> None:
    node, api = await api_node(node_factory)
    await joined(node, "room", "alice")
    url = "/v1/apps/default/channels/room/publish"
    for raw, words in ((b"", "body is not JSON"), (b"{", "body is not JSON"),
                       (b'{"event": "e", "data": NaN}', "body is not JSON: NaN is not JSON"),
                       (b'"e"', "must be a JSON object"),
                       (b'{"event": "e", "to": "x"}', "unknown key 'to'"),
                       (b'{"event": ""}', "event must be a non-empty string"),
                       (b"\xfe\xff", "body is not UTF-8")):
        status, body, _ = await api.call("POST", url, raw=raw)
        assert status == 400 and words in body["error"], (raw, body)
    limit = node.node.settings.max_message_bytes
    status, body, _ = await api.call("POST", url, raw=b'{"event": "e", "data": "' + b"x" * limit
                                     + b'"}')
    assert (status, body["error"]) == (413, f"body over {limit} bytes")
    # Exactly at the limit is fine.
    pad = limit - len(b'{"event":"e","data":""}')
    status, _, _ = await api.call("POST", url, raw=b'{"event":"e","data":"' + b"x" * pad + b'"}')
    assert status == 202


async def test_a_body_over_the_limit_is_refused_before_it_is_read(
        node_factory: NodeFactory) -> None:
    node, _ = await api_node(node_factory, MAX_MESSAGE_SIZE="1000")
    port = node.app.api_port
    assert port is not None
    head = (b"POST /v1/apps/default/channels/room/publish HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer key-one\r\nContent-Type: application/json\r\n")
    # A declared length over the limit: answered at once, the body never sent.
    status, _, body = await raw_http(port, head + b"Content-Length: 100000000\r\n\r\n")
    assert (status, body) == (413, {"error": "body over 1000 bytes"})
    # Chunked: answered once limit + 1 bytes arrived, while the body is still "coming".
    chunk = b"%x\r\n%s\r\n" % (1001, b"x" * 1001)
    status, _, body = await raw_http(port, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunk,
                                     then=b"0\r\n\r\n")
    assert (status, body) == (413, {"error": "body over 1000 bytes"})


async def test_every_answer_is_counted_by_status(node_factory: NodeFactory) -> None:
    node, api = await api_node(node_factory)
    await joined(node, "room", "alice")
    await api.get("/v1/apps/default/channels")
    await api.get("/v1/apps/default/channels")
    await api.get("/v1/apps/nope/channels")
    await api.get("/v1/apps/default/channels", key=None)
    listener = next(x for x in node.app.listeners if type(x).__name__ == "ApiListener")
    assert dict(listener.answered) == {200: 2, 404: 1, 401: 1}  # type: ignore[attr-defined]


async def test_plain_http_when_tls_is_off(node_factory: NodeFactory) -> None:
    node, api = await api_node(node_factory, TLS="false")
    assert not api.tls
    ws = await connect(f"ws://127.0.0.1:{node.port}/v1?publickey=k&id=alice")
    await ws.send(join_frame("room", "alice"))
    assert (await recv(ws))["op"] == "channel_join"
    status, body = await api.get("/v1/apps/default/channels/room/members")
    assert status == 200 and body["members"][0]["id"] == "alice"


async def test_no_keys_no_listener(node_factory: NodeFactory) -> None:
    from tests.mesh_helpers import free_port

    port = free_port()
    node = await node_factory(API_PORT=str(port))
    assert node.app.api_port is None
    assert not port_open(port)


def test_the_openapi_document() -> None:
    assert DOC["openapi"].startswith("3.1")
    for name, schema in DOC["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema), name
    ops = {(m.upper(), p) for p, item in DOC["paths"].items() for m in item}
    assert ops == {("GET", "/v1/apps/{app}/channels"),
                   ("GET", "/v1/apps/{app}/channels/{channel}/members"),
                   ("GET", "/v1/apps/{app}/users/{id}"),
                   ("POST", "/v1/apps/{app}/channels/{channel}/publish"),
                   ("GET", "/v1/admin/overview")}  # the operations page (tests/test_admin.py)


def test_the_checker_refuses_what_the_document_does_not_say() -> None:
    from tests.api_helpers import check_answer

    mesh = {"X-Prscd-MeshID": "eu"}
    nodes = {"answered": ["eu-1"], "missing": []}
    check_answer("GET", "/v1/apps/a/channels", 200, mesh, {"channels": [], "nodes": nodes})
    for status, headers, body in (
            (200, mesh, {"channels": []}),  # no nodes
            (200, mesh, {"channels": [{"name": "c", "members": 0}], "nodes": nodes}),
            (200, {}, {"channels": [], "nodes": nodes}),  # no X-Prscd-MeshID
            (202, mesh, {"nodes": 1}),  # not documented for this operation
            (404, mesh, {"error": ""}),
            (404, mesh, {"error": "x", "why": "y"})):
        with pytest.raises(AssertionError):
            check_answer("GET", "/v1/apps/a/channels", status, headers, body)
    with pytest.raises(AssertionError):
        check_answer("GET", "/elsewhere", 200, mesh, {})
