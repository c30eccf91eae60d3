"""The operations page (node/admin.py): where it is served, who may see it, and its JSON.

Without API_KEYS the node's own port serves /admin to loopback clients only; with them the
page is on the server API and its JSON needs a bearer key (every API answer is checked
against docs/openapi.json by tests/api_helpers.py). Three regions in a browser:
tests/e2e/test_admin_browser.py.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any

import aiohttp

from node.endpoints import is_local
from testkit.net import insecure
from tests.api_helpers import Api, raw_http
from tests.conftest import NodeFactory, RunningNode
from tests.helpers import data_frame, get, joined, peer
from tests.mesh.conftest import nats_factory, nats_server
from tests.mesh_helpers import NatsServer, wait_until

OVERVIEW = "/v1/admin/overview"
__all__ = ["nats_factory", "nats_server"]  # fixtures (tests/mesh/conftest.py)


async def fetch(url: str, headers: dict[str, str] | None = None,
                ) -> tuple[int, dict[str, str], bytes]:
    ctx: ssl.SSLContext | bool = insecure() if url.startswith("https") else False
    async with aiohttp.ClientSession() as session, session.get(
            url, headers=headers or {}, ssl=ctx) as reply:
        return reply.status, dict(reply.headers), await reply.read()


async def overview(node: RunningNode) -> dict[str, Any]:
    status, _, body = await get(f"https://127.0.0.1:{node.port}{OVERVIEW}")
    assert status == 200, body
    return json.loads(body)


async def test_the_page_on_the_node_port_for_loopback_clients(node: RunningNode) -> None:
    base = f"https://127.0.0.1:{node.port}"
    status, headers, body = await get(f"{base}/admin")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'src="/admin/admin.js"' in body and b"http://" not in body  # nothing from outside
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for path, kind in (("/admin/admin.js", "text/javascript"), ("/admin/admin.css", "text/css")):
        status, headers, _ = await get(base + path)
        assert (status, headers["Content-Type"].split(";")[0]) == (200, kind)

    o = await overview(node)
    me = node.node
    assert o["node"]["node_id"] == me.node_id and o["node"]["mesh_id"] == me.mesh_id
    assert o["node"]["bus"] == {"kind": "embedded", "state": me.bus.state}
    assert [(r["mesh_id"], r["state"], r["alive"]) for r in o["regions"]] == [
        (me.mesh_id, "alive", 1)]
    [row] = o["nodes"]
    assert (row["node"], row["self"], row["state"], row["peers"]) == (me.node_id, True,
                                                                       "alive", 0)
    assert o["channels"] == [] and o["missing"] == []


async def test_peers_channels_rates_and_drops_move(node: RunningNode) -> None:
    a = await joined(node, "busy", "alice")
    # bob twice (two connections of one id); these never read: the node's stop ends them.
    _readers = [await joined(node, "busy", "bob"), await joined(node, "busy", "bob")]
    c = await joined(node, "quiet", "carol")
    stray = await peer(node, "dora")
    await stray.send(data_frame("nowhere", "x", '"y"'))  # not joined: dropped, counted
    o = await overview(node)
    assert o["channels"][:2] == [
        {"app": "default", "channel": "busy", "members": 2, "connections": 3, "nodes": 1},
        {"app": "default", "channel": "quiet", "members": 1, "connections": 1, "nodes": 1}]
    assert o["nodes"][0]["peers"] == 5 and o["regions"][0]["peers"] == 5
    await wait_until(lambda: node.node.presence.dropped["not_joined"] >= 1, 5, "the drop")

    async def sending() -> None:
        while True:
            await a.send(data_frame("busy", "tick", "1"))
            await asyncio.sleep(0.02)

    sender = asyncio.get_running_loop().create_task(sending())
    try:
        async def moving() -> bool:
            got = await overview(node)
            return got["rates"]["handled"] > 0 and got["rates"]["delivered"] > 0

        await wait_until(moving, 10, "frame and delivery rates above zero")
    finally:
        sender.cancel()
    o = await overview(node)
    drops = {d["reason"]: d["total"] for d in o["dropped"]}
    assert drops["not_joined"] >= 1 and o["nodes"][0]["dropped"]["not_joined"] >= 1
    for ws in (a, c, stray):
        await ws.close()


async def test_not_for_other_clients_nor_through_a_proxy(node: RunningNode) -> None:
    port = node.port
    for extra in (b"Host: example.com\r\n",  # a DNS-rebound name
                  b"Host: 127.0.0.1\r\nX-Forwarded-For: 203.0.113.9\r\n"):
        request = b"GET /v1/admin/overview HTTP/1.1\r\n" + extra + b"\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=insecure(),
                                                       server_hostname="localhost")
        writer.write(request)
        head = (await asyncio.wait_for(reader.read(4096), 5)).decode("latin-1")
        writer.close()
        assert head.startswith("HTTP/1.1 403"), head
        assert "loopback clients only" in head


def test_is_local() -> None:
    host = {"Host": "127.0.0.1:8443"}
    assert is_local(("127.0.0.1", 5000), host)
    assert is_local(("::1", 5000, 0, 0), {"Host": "[::1]:8443"})
    assert is_local(("::ffff:127.0.0.1", 5000, 0, 0), {"Host": "localhost"})
    assert not is_local(("10.0.0.2", 5000), host)
    assert not is_local(("127.0.0.1", 5000), {"Host": "evil.example:8443"})
    assert not is_local(("127.0.0.1", 5000), {**host, "Forwarded": "for=203.0.113.9"})
    assert not is_local(None, host) and not is_local(("not an ip", 1), host)


async def test_admin_local_false_serves_nothing(node_factory: NodeFactory) -> None:
    node = await node_factory(ADMIN_LOCAL="false")
    for path in ("/admin", OVERVIEW):
        status, _, body = await get(f"https://127.0.0.1:{node.port}{path}")
        assert status == 404 and b"not served on this port" in body


async def test_on_the_server_api_behind_its_keys(node_factory: NodeFactory) -> None:
    node = await node_factory(API_KEYS="ops-key,other", API_PORT="0")
    assert node.app.api_port is not None
    # Not on the node's port any more, even for loopback clients.
    status, _, _ = await get(f"https://127.0.0.1:{node.port}/admin")
    assert status == 404
    base = f"https://127.0.0.1:{node.app.api_port}"
    status, headers, body = await fetch(base + "/admin")  # the page holds no data: no key
    assert status == 200 and b"API_KEYS" in body and "X-Prscd-MeshID" in headers
    assert headers["X-Frame-Options"] == "DENY"
    status, headers, _ = await fetch(base + "/admin/admin.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")

    api = Api(node.app.api_port, "ops-key")
    status, body = await api.get(OVERVIEW, key=None)
    assert status == 401 and "missing bearer key" in body["error"]
    status, body = await api.get(OVERVIEW, key="wrong")
    assert status == 401 and body["error"] == "bearer key not accepted"
    ws = await joined(node, "room", "alice")
    status, body = await api.get(OVERVIEW)  # schema-checked against docs/openapi.json
    assert status == 200 and body["node"]["node_id"] == node.node.node_id
    assert body["channels"] == [{"app": "default", "channel": "room", "members": 1,
                                 "connections": 1, "nodes": 1}]
    status, body, headers = await api.call("POST", OVERVIEW)
    assert (status, headers["Allow"]) == (405, "GET")
    # An unknown /v1/admin path is the API's 404, not the overview.
    status, body = await api.get("/v1/admin/other")
    assert status == 404
    assert node.node.presence.dropped["api_unauthorized"] == 2
    await ws.close()


async def test_the_query_string_does_not_matter(node_factory: NodeFactory) -> None:
    node = await node_factory(API_KEYS="k", API_PORT="0")
    assert node.app.api_port is not None
    status, _, body = await raw_http(
        node.app.api_port, b"GET /v1/admin/overview?t=1 HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer k\r\nConnection: close\r\n\r\n")
    assert status == 200 and body["node"]["node_id"] == node.node.node_id




async def test_two_regions_on_a_real_nats_server_and_one_that_left(
        node_factory: NodeFactory, nats_server: NatsServer) -> None:
    env = {"NATS_URL": nats_server.url, "NODE_TIMEOUT": "3"}
    east = await node_factory(MESH_ID="us-east", **env)
    west = await node_factory(MESH_ID="eu-west", **env)
    for n in (east, west):
        await wait_until(lambda n=n: len(n.node.liveness.nodes) == 1, 10, "the other node")
    a = await joined(east, "lobby", "ana")
    b = await joined(west, "lobby", "ben")
    b2 = await joined(west, "lobby", "cy")

    async def both() -> dict[str, Any] | None:
        o = await overview(east)
        return o if o["channels"] and o["channels"][0]["nodes"] == 2 else None

    o = await wait_until(both, 10, "both nodes' channels merged")
    assert o["channels"][0] == {"app": "default", "channel": "lobby", "members": 3,
                                "connections": 3, "nodes": 2}
    assert [(r["mesh_id"], r["state"], r["peers"]) for r in o["regions"]] == [
        ("eu-west", "alive", 2), ("us-east", "alive", 1)]
    row = {n["node"]: n for n in o["nodes"]}[west.node.node_id]
    assert row["answered"] and row["heartbeat_age_s"] < 3 and row["uptime_s"] > 0

    for ws in (b, b2):
        await ws.close()
    await west.app.stop()  # a goodbye: dead at once, reason "left"

    async def left() -> dict[str, Any] | None:
        o = await overview(east)
        rows = {n["node"]: n for n in o["nodes"]}
        return o if rows[west.node.node_id]["state"] == "dead" else None

    o = await wait_until(left, 5, "the node that left shown dead")
    row = {n["node"]: n for n in o["nodes"]}[west.node.node_id]
    assert (row["reason"], row["mesh_id"], row["heartbeat_age_s"]) == ("left", "eu-west", None)
    assert [(r["mesh_id"], r["state"], r["dead"]) for r in o["regions"]] == [
        ("eu-west", "dead", 1), ("us-east", "alive", 0)]
    await a.close()
