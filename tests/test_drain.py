"""A drain (SIGTERM with DRAIN_SECONDS) is over as soon as no peer is left: a `docker compose
down` or restart of an idle node does not wait DRAIN_SECONDS (docker-compose.yml sets 20)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

from tests.helpers import get, insecure, join_frame, recv
from tests.test_cli import run_prscd


async def member(port: int, who: str) -> ClientConnection:
    """A peer in channel "room" (its join acknowledged)."""
    ws = await connect(f"wss://127.0.0.1:{port}/v1?publickey=k&id={who}", ssl=insecure())
    await ws.send(join_frame("room", who))
    await recv(ws)
    return ws


async def test_an_idle_node_stops_at_once_despite_drain_seconds(tmp_path: Path) -> None:
    async with run_prscd(tmp_path, DRAIN_SECONDS="30", PUBLIC_URL="https://127.0.0.1:9444/v1") \
            as prscd:
        # The log line a user copies names PUBLIC_URL, not the port inside a container.
        assert "url=https://127.0.0.1:9444/v1 " in await prscd.wait_log("listening url=")
        hint = await prscd.wait_log("--origin-to-force-quic-on=")
        assert "--origin-to-force-quic-on=127.0.0.1:9444 https://127.0.0.1:9444/" in hint
        started = time.monotonic()
        prscd.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(prscd.proc.wait(), 10) == 0
        assert time.monotonic() - started < 5
        await prscd.wait_log("drain over: no peer left")


async def test_the_drain_ends_when_the_last_peer_leaves(tmp_path: Path) -> None:
    async with run_prscd(tmp_path, DRAIN_SECONDS="30") as prscd:
        a, b = [await member(prscd.port, who) for who in ("alice", "bob")]
        prscd.proc.send_signal(signal.SIGTERM)
        await prscd.wait_log("draining")
        await a.close()
        # One peer is still served: the node is draining, not stopping.
        status, _, _ = await get(f"https://127.0.0.1:{prscd.port}/ready")
        assert status == 503 and prscd.proc.returncode is None
        started = time.monotonic()
        await b.close()
        assert await asyncio.wait_for(prscd.proc.wait(), 10) == 0
        assert time.monotonic() - started < 5
        assert "drain over: no peer left" in "\n".join(prscd.log)
