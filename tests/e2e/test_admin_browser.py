"""The operations page (/admin) in real headless Chromium, on three regions joined by NATS
gateways (real nats-servers, infra/cluster.py's topology): the page shows three live
regions, their peers and the busiest channels; after one region's node is SIGKILLed the
page shows it dead within NODE_TIMEOUT + 2 s, without a reload.

us-east serves the page on its server API (API_KEYS: the page asks for the key, as an
operator would type it); eu-west runs in this process; ap-south is a process of its own, to
be killed. The screenshot goes to test-artifacts/admin.png; with PRSCD_DOCS_SCREENSHOTS=1
also to docs/admin.png (node ids are random: rewriting it on every run would only churn).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import NodeFactory, RunningNode
from tests.e2e import test_browser
from tests.e2e.test_browser import ARTIFACTS, Browser, browser
from tests.helpers import data_frame, insecure, join_frame, recv
from tests.mesh.conftest import gateway_cluster
from tests.mesh_helpers import wait_until

__all__ = ["browser"]  # the fixture, imported for this module's tests
pytestmark = test_browser.pytestmark  # Chromium, Node.js and playwright-core, or skipped
REGIONS = ("us-east", "eu-west", "ap-south")
NODE_TIMEOUT = 3.0
KEY = "ops-key"
DOCS_PICTURE = ARTIFACTS.parent / "docs" / "admin.png"


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    yield from gateway_cluster(tmp_path_factory, "admin-cluster",
                               {"NODE_TIMEOUT": str(NODE_TIMEOUT), "ADMIN_LOCAL": "false"})


async def member(url: str, channel: str, client_id: str) -> ClientConnection:
    """A raw WebSocket peer (testkit's frames), joined; ``url`` ends in /v1."""
    ws = await connect(url.replace("https:", "wss:") + f"?publickey=key&id={client_id}",
                       ssl=insecure())
    await ws.send(join_frame(channel, client_id))
    ack = await recv(ws, 10)
    assert ack["op"] == "channel_join", ack
    return ws


@pytest.fixture
async def peers() -> AsyncIterator[list[ClientConnection]]:
    opened: list[ClientConnection] = []
    yield opened
    for ws in opened:
        ws.transport.abort()  # some never read: no closing handshake to wait for


async def test_three_regions_then_one_killed(
        node_factory: NodeFactory, gateways: Any, browser: Browser,
        peers: list[ClientConnection]) -> None:
    env = {"NODE_TIMEOUT": str(NODE_TIMEOUT)}
    east = await node_factory(MESH_ID="us-east", NATS_URL=gateways.nats_url("us-east"),
                              API_KEYS=KEY, API_PORT="0", **env)
    west = await node_factory(MESH_ID="eu-west", NATS_URL=gateways.nats_url("eu-west"), **env)
    gateways.start_node("ap-south")
    try:
        await _watch(east, west, gateways, browser, peers)
    finally:
        gateways.stop("node", "ap-south")


async def _watch(east: RunningNode, west: RunningNode, gateways: Any, browser: Browser,
                 peers: list[ClientConnection]) -> None:
    def south_up() -> bool:
        try:
            health = gateways.node_health("ap-south")
        except OSError:
            return False
        return health["bus"]["state"] == "connected" and health["mesh"]["nodes_alive"] >= 2

    await wait_until(lambda: asyncio.to_thread(south_up), 30, "ap-south's node meshed")
    victim = (await asyncio.to_thread(gateways.node_health, "ap-south"))["node_id"]
    for n in (east, west):
        await wait_until(lambda n=n: len(n.node.liveness.nodes) >= 2, 10, "three nodes")

    south_url = gateways.node_url("ap-south")
    for url, names in ((east.url, ["ana", "ben", "cy"]), (west.url, ["dee", "eli"]),
                       (south_url, ["fay", "gus", "hal", "ivy"])):
        for name in names:
            peers.append(await member(url, "lobby", name))
    for name in ("ana", "jo"):
        peers.append(await member(east.url, "design-review", name))
    peers.append(await member(south_url, "incident-42", "kim"))
    sender = asyncio.get_running_loop().create_task(_chatter(peers[0]))

    assert east.app.api_port is not None and east.node.cert is not None
    await browser.launch(east)  # trusts the dev certificate (SPKI), which the API uses too
    await browser.call("open", url=f"https://127.0.0.1:{east.app.api_port}/admin")
    try:
        # No key yet: the JSON answers 401 and the page asks for one.
        await until(browser, "!document.getElementById('keyform').hidden", 10)
        assert await browser.call("eval", expr="prscdAdmin.status") == "error"
        await browser.call("eval", expr=f"document.getElementById('key').value = '{KEY}';"
                                        "document.getElementById('keyform').requestSubmit();"
                                        "window.notReloaded = true")
        three_alive = ("[...document.querySelectorAll('#regions [data-region]')]"
                       ".filter(e => e.dataset.state === 'alive').length === 3")
        await until(browser, three_alive, 15)
        await until(browser, "prscdAdmin.last.rates.handled > 0 && "
                           "document.querySelector('#channels tr[data-channel=\"lobby\"]')", 15)
        o = json.loads(await browser.call("eval", expr="JSON.stringify(prscdAdmin.last)"))
        assert [(r["mesh_id"], r["state"], r["alive"]) for r in o["regions"]] == [
            ("ap-south", "alive", 1), ("eu-west", "alive", 1), ("us-east", "alive", 1)]
        assert {r["mesh_id"]: r["peers"] for r in o["regions"]} == {
            "us-east": 5, "eu-west": 2, "ap-south": 5}
        assert o["channels"][0] == {"app": "default", "channel": "lobby", "members": 9,
                                    "connections": 9, "nodes": 3}
        assert {c["channel"] for c in o["channels"]} == {"lobby", "design-review",
                                                        "incident-42"}
        assert o["nodes"][0]["node"] == east.node.node_id and o["nodes"][0]["self"]
        assert all(n["answered"] for n in o["nodes"]) and o["missing"] == []
        text = await browser.call("eval", expr="document.body.innerText")
        for words in ("us-east", "eu-west", "ap-south", "lobby", "design-review", "Drops"):
            assert words in text, words
        await browser.call("screenshot", path=str(ARTIFACTS / "admin.png"))
        if os.environ.get("PRSCD_DOCS_SCREENSHOTS") == "1":
            shutil.copyfile(ARTIFACTS / "admin.png", DOCS_PICTURE)

        polls = await browser.call("eval", expr="prscdAdmin.polls")
        gateways.send_signal("node", "ap-south", signal.SIGKILL)
        t0 = time.monotonic()
        dead = (f"document.querySelector('#nodes tr[data-node=\"{victim}\"]')?.dataset.state"
                " === 'dead' && document.querySelector('#regions [data-region=\"ap-south\"]')"
                ".dataset.state === 'dead'")
        await until(browser, dead, NODE_TIMEOUT + 2)
        took = time.monotonic() - t0
        print(f"\nadmin page shows the killed node dead after {took:.2f} s "
              f"(NODE_TIMEOUT {NODE_TIMEOUT:g} s)")
        assert took <= NODE_TIMEOUT + 2
        assert await browser.call("eval", expr="window.notReloaded === true")
        assert await browser.call("eval", expr="prscdAdmin.polls") > polls
        o = json.loads(await browser.call("eval", expr="JSON.stringify(prscdAdmin.last)"))
        [row] = [n for n in o["nodes"] if n["node"] == victim]
        assert (row["state"], row["reason"], row["mesh_id"]) == ("dead", "timeout", "ap-south")
        assert {r["mesh_id"]: r["state"] for r in o["regions"]} == {
            "us-east": "alive", "eu-west": "alive", "ap-south": "dead"}
        await browser.call("screenshot", path=str(ARTIFACTS / "admin-node-dead.png"))
    finally:
        sender.cancel()
        with suppress(asyncio.CancelledError):
            await sender
        (ARTIFACTS / "admin-console.txt").write_text(browser.console_text())


async def until(browser: Browser, expr: str, timeout: float) -> None:
    """Poll ``expr`` in the page (Browser.wait's waitForFunction evaluates a string, which
    the page's Content-Security-Policy refuses: no 'unsafe-eval')."""
    async def true() -> bool:
        return bool(await browser.call("eval", expr=f"!!({expr})"))

    await wait_until(true, timeout, expr, interval=0.05)


async def _chatter(ws: ClientConnection) -> None:
    """A few messages a second in the lobby: the rates are not all zero."""
    while True:
        await ws.send(data_frame("lobby", "cursor", '{"x":1}'))
        await asyncio.sleep(0.1)
