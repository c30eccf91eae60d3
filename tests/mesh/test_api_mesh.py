"""The server API across three regions: nats-servers joined by gateways (infra/cluster.py's
topology, NATS only), a node per region, real @yomo/presence clients. Every answer is
checked against docs/openapi.json (tests/api_helpers.py)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.api_helpers import Api
from tests.conftest import NodeFactory, RunningNode
from tests.e2e.puppet import Puppet
from tests.mesh.conftest import PuppetFactory, gateway_cluster
from tests.mesh.test_two_nodes import marker
from tests.mesh_helpers import wait_until

REGIONS = ("us-east", "eu-west", "ap-south")
CH = "api-room"


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Three nats-servers, one per region, joined by gateways; nodes are up to each test."""
    yield from gateway_cluster(tmp_path_factory, "api-cluster",
                               {"API_KEYS": "mesh-key", "NODE_TIMEOUT": "3"})


async def start(node_factory: NodeFactory, gateways: Any,
                regions: tuple[str, ...] = REGIONS) -> dict[str, RunningNode]:
    nodes = {r: await node_factory(MESH_ID=r, NATS_URL=gateways.nats_url(r),
                                   API_KEYS="mesh-key", API_PORT="0") for r in regions}
    await meshed(nodes.values(), len(regions) - 1)
    return nodes


async def meshed(nodes: Any, others: int) -> None:
    for n in nodes:
        await wait_until(lambda n=n: len(n.node.liveness.nodes) >= others, 10,
                         f"{n.node.node_id} to hear {others} other nodes")


def api(node: RunningNode) -> Api:
    assert node.app.api_port is not None
    return Api(node.app.api_port, "mesh-key")


async def client(make: PuppetFactory, url: str, name: str, region: str) -> Puppet:
    p = await make(f"{name}@{region}")
    await p.connect(url, "key", name)
    await p.join(CH, {"name": name.title(), "region": region})
    return p


async def test_members_counts_and_a_user_in_two_regions(
        node_factory: NodeFactory, gateways: Any, make_puppet: PuppetFactory) -> None:
    nodes = await start(node_factory, gateways)
    alice = await client(make_puppet, nodes["us-east"].url, "alice", "us-east")
    await client(make_puppet, nodes["eu-west"].url, "bob", "eu-west")
    await client(make_puppet, nodes["ap-south"].url, "carol", "ap-south")
    await client(make_puppet, nodes["us-east"].url, "dave", "us-east")
    await client(make_puppet, nodes["ap-south"].url, "dave", "ap-south")
    await alice.wait_peers(CH, {"bob", "carol", "dave"}, timeout=10)

    for region in REGIONS:  # every node gives the same mesh-wide answer
        status, body = await api(nodes[region]).get(f"/v1/apps/default/channels/{CH}/members")
        assert status == 200
        assert body["nodes"]["missing"] == []
        assert body["nodes"]["answered"][0] == nodes[region].node.node_id
        assert sorted(body["nodes"]["answered"]) == sorted(n.node.node_id for n in nodes.values())
        got = [(m["id"], m["mesh_id"], m["connections"], m["state"]["region"])
               for m in body["members"]]
        assert got == [("alice", "us-east", 1, "us-east"), ("bob", "eu-west", 1, "eu-west"),
                       ("carol", "ap-south", 1, "ap-south"), ("dave", "ap-south", 1, "ap-south"),
                       ("dave", "us-east", 1, "us-east")], got
        assert body["members"][0]["state"]["name"] == "Alice"

    status, body = await api(nodes["eu-west"]).get("/v1/apps/default/channels")
    assert (status, body["channels"]) == (200, [{"name": CH, "members": 5}])
    status, body = await api(nodes["eu-west"]).get("/v1/apps/default/users/dave")
    assert (status, body["online"], body["connections"], body["mesh_ids"], body["channels"]) == (
        200, True, 2, ["ap-south", "us-east"], [CH])
    status, body = await api(nodes["ap-south"]).get("/v1/apps/default/users/nobody")
    assert (status, body["online"], body["mesh_ids"]) == (200, False, [])
    status, body = await api(nodes["us-east"]).get("/v1/apps/other/channels")
    assert status == 404 and "no member on any of the 3 nodes that answered" in body["error"]


async def test_publish_reaches_real_clients_on_every_node_once(
        node_factory: NodeFactory, gateways: Any, make_puppet: PuppetFactory) -> None:
    nodes = await start(node_factory, gateways)
    clients = [await client(make_puppet, nodes[r].url, f"p{i}", r)
               for i, r in enumerate(REGIONS)]
    clients.append(await client(make_puppet, nodes["eu-west"].url, "p3", "eu-west"))
    for p in clients:
        await p.subscribe(CH, "notice")
    await clients[0].wait_peers(CH, {"p1", "p2", "p3"}, timeout=10)
    for p in clients[1:]:
        await p.wait_peers(CH, {c.name.split("@")[0] for c in clients} - {p.name.split("@")[0]},
                           timeout=10)

    status, body = await api(nodes["eu-west"]).post(
        f"/v1/apps/default/channels/{CH}/publish", {"event": "notice", "data": {"n": 1}})
    assert (status, body) == (202, {"nodes": 3})
    for p in clients:
        [got] = await p.wait_data(CH, "notice", timeout=10)
        assert (got["from"], got["data"]) == ("backend", {"n": 1})
    # Later traffic from every region reached every client: no second copy is on its way.
    for p in clients:
        for q in clients:
            if p is not q:
                await marker(q, p, CH)
        assert len(p.data(CH, "notice")) == 1


async def test_a_killed_node_is_missing_within_the_deadline(
        node_factory: NodeFactory, gateways: Any, make_puppet: PuppetFactory) -> None:
    nodes = await start(node_factory, gateways, ("us-east", "eu-west"))
    # ap-south is a process of its own, to be killed with SIGKILL (as tests/mesh/test_failures.py).
    gateways.start_node("ap-south")
    try:
        # Not cluster.wait_nodes(): it blocks, and the nodes of this loop must heartbeat.
        def up() -> bool:
            try:
                health = gateways.node_health("ap-south")
            except OSError:  # not listening yet
                return False
            return health["bus"]["state"] == "connected" and health["mesh"]["nodes_alive"] >= 2

        await wait_until(lambda: asyncio.to_thread(up), 30, "ap-south's node meshed")
        victim = (await asyncio.to_thread(gateways.node_health, "ap-south"))["node_id"]
        await meshed(nodes.values(), 2)
        await client(make_puppet, nodes["us-east"].url, "alice", "us-east")
        carol = await client(make_puppet, gateways.node_url("ap-south"), "carol", "ap-south")
        await carol.wait_peers(CH, {"alice"}, timeout=10)
        east = api(nodes["us-east"])
        status, body = await east.get(f"/v1/apps/default/channels/{CH}/members")
        assert [m["id"] for m in body["members"]] == ["alice", "carol"]

        gateways.send_signal("node", "ap-south", signal.SIGKILL)
        deadline = nodes["us-east"].node.settings.api_query_timeout
        t0 = time.monotonic()
        status, body = await east.get(f"/v1/apps/default/channels/{CH}/members")
        took = time.monotonic() - t0
        print(f"\nmembers with a killed node: {took * 1000:.0f} ms (deadline {deadline} s)")
        assert status == 200 and body["nodes"]["missing"] == [victim]
        assert sorted(body["nodes"]["answered"]) == sorted(n.node.node_id
                                                           for n in nodes.values())
        assert [m["id"] for m in body["members"]] == ["alice"]
        assert deadline * 0.9 <= took < deadline + 0.5
        # Once liveness declared it dead (NODE_TIMEOUT), it is no longer waited for.
        await wait_until(lambda: victim not in nodes["us-east"].node.liveness.nodes, 10,
                         "the killed node declared dead")
        t0 = time.monotonic()
        status, body = await east.get(f"/v1/apps/default/channels/{CH}/members")
        assert body["nodes"]["missing"] == [] and time.monotonic() - t0 < deadline
    finally:
        gateways.stop("node", "ap-south")


async def test_a_node_that_answers_with_an_error_is_missing_not_merged(
        node_factory: NodeFactory, gateways: Any, make_puppet: PuppetFactory) -> None:
    """Version skew: a node that does not know a kind answers with an error at once."""
    nodes = await start(node_factory, gateways, ("us-east", "eu-west"))
    await client(make_puppet, nodes["us-east"].url, "alice", "us-east")
    await client(make_puppet, nodes["eu-west"].url, "bob", "eu-west")
    west = nodes["eu-west"].node.node_id
    del nodes["eu-west"].app.query._handlers["members"]  # as a node without this kind
    t0 = time.monotonic()
    status, body = await api(nodes["us-east"]).get(f"/v1/apps/default/channels/{CH}/members")
    assert status == 200 and time.monotonic() - t0 < 0.5  # an error is an answer: no wait for the deadline
    assert body["nodes"] == {"answered": [nodes["us-east"].node.node_id], "missing": [west]}
    assert [m["id"] for m in body["members"]] == ["alice"]
