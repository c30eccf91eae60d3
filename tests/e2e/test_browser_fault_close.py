"""Real Chromium + @yomo/presence: a WebTransport session the node closes for a fault.

The node sends the close capsule, stops reading the connection and closes it
(CONNECTION_CLOSE) FAULT_GRACE later (node/transports/webtransport.py). The real client
must see the capsule first: its ``closed`` then resolves and it does not reconnect; had
the connection's close come first, ``closed`` would reject and it would reconnect 10 s
later (as after a stopping node: tests/e2e/test_browser.py).
"""

from __future__ import annotations

import asyncio
import time

from node.transports.webtransport import FAULT_GRACE
from tests.conftest import NodeFactory
from tests.e2e import test_browser
from tests.e2e.test_browser import Browser, browser, demo_url
from tests.mesh_helpers import wait_until
from tests.test_webtransport import wt_transport

__all__ = ["browser"]  # the fixture, imported for this module's tests
pytestmark = test_browser.pytestmark  # Chromium, Node.js and playwright-core, or skipped
#: The client's reconnect delay after a rejected ``closed`` (10 s), and a margin.
NO_RECONNECT_FOR = 13.0


async def test_the_real_client_closed_for_a_flood_sees_the_capsule_and_stays_away(
        node_factory: NodeFactory, browser: Browser) -> None:
    node = await node_factory(WEBTRANSPORT="true", RATE_LIMIT="5", RATE_BURST="5")
    listener = wt_transport(node)
    await browser.launch(node)
    await browser.call("open", url=demo_url(node, "webtransport.html", "flooder", "Flood"))
    await browser.wait("prscdDemo.joined === true", timeout=15)
    assert [p.client_id for p in node.node.presence.peers.values()] == ["flooder"]
    conns = {c for c in listener.connections if c.sessions}
    assert len(conns) == 1

    await browser.call("eval", expr="(() => { for (let i = 0; i < 300; i++) "
                                    "prscdDemo.broadcast('flood', {i}); return true; })()")
    await wait_until(lambda: node.node.presence.dropped["rate_flood"] == 1, 10, "the 1008")
    closed_at = time.monotonic()
    await browser.wait("prscdDemo.status === 'closed'", timeout=5)
    (conn,) = conns
    await wait_until(lambda: conn.terminated, FAULT_GRACE + 2.0, "the connection closed")
    assert time.monotonic() - closed_at >= FAULT_GRACE - 0.1

    # No reconnect: nothing new reaches the node (a reconnect is a new connection and peer).
    while time.monotonic() - closed_at < NO_RECONNECT_FOR:
        assert not node.node.presence.peers, "the client reconnected"
        # (The page's own HTTP/3 connection stays: it never carried a session.)
        assert not [c for c in listener.connections if c._ever_session], "a new session"
        await asyncio.sleep(0.2)
    assert await browser.call("eval", expr="prscdDemo.status") == "closed"
    console = browser.console_text()
    assert "START Reconnect" not in console, console[-2000:]
