"""The browser path as a user meets it: the command line the node logs, run as logged.

A real `prscd` process logs how to open the demo with native WebTransport; this test takes
that line from the log and runs it through a shell, as a user pasting it would (so its
`$(mktemp -d)` makes a fresh profile). Added, and only these, because CI has no screen and
runs as root: `--headless`, `--no-sandbox` and `--remote-debugging-port`, to read the page
over the DevTools protocol (no test framework's profile handling in between). The demo page
must say it runs on native WebTransport, not the WebSocket polyfill it falls back to when
Chromium ignores the certificate flags. A screenshot goes to test-artifacts/ (the one in
docs/ was taken this way).

What cannot be shown headless: the failure without `--user-data-dir`. Headless Chromium
gives itself a profile directory (~/.config/chromium-headless) when none is named, and
then honours the SPKI flag (tried: the same line without it reached native WebTransport
too); a Chromium on a screen does not, which is what the logged line guards against.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.test_cli import Proc, run_prscd

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
#: What a machine without a screen, running as root, needs; nothing else is added.
HEADLESS = "--headless --no-sandbox --remote-debugging-port=0"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}")


def logged_command(line: str) -> str:
    command = re.search(r"(chromium --user-data-dir=.*)$", line)
    assert command, line
    return command.group(1)


class Page:
    """One page over the DevTools protocol (JSON over WebSocket)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws, self._ids = ws, itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        request = next(self._ids)
        await self.ws.send(json.dumps({"id": request, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == request:
                assert "error" not in reply, reply
                return reply["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float) -> Any:
        """Polls ``expression`` until truthy; an evaluation the page's navigation cut off
        (after a click on a link: "Inspected target navigated or closed", seen once in a
        full run) counts as not yet."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                value = await self.evaluate(expression)
            except AssertionError as exc:
                if "navigated or closed" not in str(exc):
                    raise
                value = None
            if value or asyncio.get_running_loop().time() > deadline:
                return value
            await asyncio.sleep(0.1)


@asynccontextmanager
async def chromium(command: str, home: Path) -> AsyncIterator[Page]:
    """Run ``command`` (the logged one, headless flags added after the program name) in a
    shell; yield the page it opened."""
    shell = command.replace("chromium ", f"{CHROMIUM} {HEADLESS} ", 1)
    env = {**os.environ, "TMPDIR": str(home), "HOME": str(home)}  # mktemp -d lands here
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", shell, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)
    try:
        assert proc.stderr is not None
        port = None
        while port is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "Chromium exited before its DevTools line"
            if found := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                port = int(found.group(1))
        pages: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                async with http.get(f"http://127.0.0.1:{port}/json/list") as answer:
                    pages = [t for t in await answer.json() if t["type"] == "page"]
                if pages:
                    break
                await asyncio.sleep(0.1)
        [page] = pages
        async with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            yield Page(ws)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the shell's session: Chromium's processes
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


async def open_demo(page: Page, origin: str) -> str:
    """From the page the command opened (the index), follow the WebTransport demo link;
    returns what the page says about its transport once it has connected (or given up)."""
    loaded = ("location.href !== 'about:blank' && document.readyState === 'complete'"
              " && location.href")
    assert await page.wait_for(loaded, 15) == f"https://{origin}/"
    await page.evaluate("document.querySelector('a[href=\"/webtransport.html\"]').click()")
    # '…' until the demo's script runs, then 'not connected yet' until the client decides.
    settled = ("(() => { const t = document.querySelector('#transport');"
               " const s = t ? t.textContent : '';"
               " return s !== '…' && !s.startsWith('not connected') && s; })()")
    return str(await page.wait_for(settled, 20))


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Proc]:
    (tmp_path / "node").mkdir()
    async with run_prscd(tmp_path / "node") as proc:
        yield proc


async def test_the_logged_command_line_reaches_native_webtransport(
        node: Proc, tmp_path: Path) -> None:
    line = await node.wait_log("--origin-to-force-quic-on=")
    command = logged_command(line)
    origin = f"127.0.0.1:{node.port}"
    assert command.endswith(f"--origin-to-force-quic-on={origin} https://{origin}/")
    # The demo's index page prints the same command for this origin.
    async with chromium(command, tmp_path) as page:
        transport = await open_demo(page, origin)
        assert transport == "native WebTransport (HTTP/3)", transport
        await page.call("Emulation.setDeviceMetricsOverride", width=1100, height=760,
                        deviceScaleFactor=1, mobile=False)
        await page.wait_for("document.querySelector('#status').textContent.includes('joined')",
                            10)
        shot = await page.call("Page.captureScreenshot", format="png")
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "browser-documented.png").write_bytes(base64.b64decode(shot["data"]))
        await page.evaluate("location.href = '/'")
        shown = await page.wait_for(
            "(() => { const t = document.querySelector('#flags').textContent;"
            " return t.includes('spki-list=') && !t.includes('…') && t; })()", 10)
        assert str(shown).replace("\\", "") == command.replace("\\", ""), shown
    # The profile the command made is where the shell's mktemp put it.
    assert any(p.is_dir() for p in tmp_path.glob("tmp.*"))

