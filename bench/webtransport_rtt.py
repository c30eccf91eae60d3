"""Datagram round trip through one node: aioquic client A -> node -> B -> node -> A.

    .venv/bin/python -m bench.webtransport_rtt [--pings 500] [--size 64]

B answers every `data` message from A at once, so one round trip is two passes through
the node. Also prints the one-way time A -> node -> B (same process, same clock) and,
for comparison, the same round trip between two WebSocket peers. Not a test: numbers
depend on the machine; everything runs in one process on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from node.app import App
from node.config import Settings
from node.tls import ensure_certificate
from testkit.frames import control, data_frame, join_frame
from testkit.net import insecure
from testkit.wt_client import WTClient, wt_connect


def summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 3),
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
            "max_ms": round(ms[-1], 3)}


async def wt_join(wt: WTClient, client_id: str) -> None:
    wt.send_datagram(join_frame("bench", client_id))
    await wt.next_message(match=lambda m: m.get("op") == "channel_join")
    wt.send_datagram(control("peer_online", "bench"))


async def webtransport(port: int, pings: int, size: int) -> dict[str, Any]:
    async with wt_connect(port, "/v1?publickey=k&id=a") as a, \
            wt_connect(port, "/v1?publickey=k&id=b") as b:
        await wt_join(a, "a")
        await wt_join(b, "b")
        await a.next_message(match=lambda m: m.get("op") == "peer_online")
        rtt, one_way = [], []
        pad = "x" * size
        for i in range(pings):
            sent = time.perf_counter()
            a.send_datagram(data_frame("bench", "ping", json.dumps([i, pad])))
            got = await b.next_message(match=lambda m: m.get("t") == "data")
            one_way.append(time.perf_counter() - sent)
            b.send_datagram(data_frame("bench", "pong", got["pl"].hex()[:8]))
            await a.next_message(match=lambda m: m.get("t") == "data")
            rtt.append(time.perf_counter() - sent)
        return {"round_trip": summary(rtt), "one_way": summary(one_way)}


async def websocket(port: int, pings: int, size: int) -> dict[str, Any]:
    url = f"wss://127.0.0.1:{port}/v1?publickey=k&id="
    async with connect(url + "wa", ssl=insecure()) as a, \
            connect(url + "wb", ssl=insecure()) as b:
        for ws, cid in ((a, "wa"), (b, "wb")):
            await ws.send(join_frame("bench-ws", cid))
            await ws.recv()
        rtt = []
        pad = "x" * size
        for i in range(pings):
            sent = time.perf_counter()
            await a.send(data_frame("bench-ws", "ping", json.dumps([i, pad])))
            await b.recv()
            await b.send(data_frame("bench-ws", "pong", '"p"'))
            await a.recv()
            rtt.append(time.perf_counter() - sent)
        return {"round_trip": summary(rtt)}


async def main(pings: int, size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env({"PORT": "0", "HOST": "127.0.0.1", "WEBTRANSPORT": "true",
                                      "PID_FILE": f"{tmp}/pid", "CERT_CACHE_DIR": tmp})
        node = App(settings, ensure_certificate("", "", Path(tmp)))
        await node.start()
        try:
            await webtransport(node.port, 50, size)  # warm-up
            result = {"pings": pings, "payload_bytes": size,
                      "webtransport_datagrams": await webtransport(node.port, pings, size),
                      "websocket": await websocket(node.port, pings, size)}
        finally:
            await node.stop()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=500)
    parser.add_argument("--size", type=int, default=64, help="padding in each ping's data")
    args = parser.parse_args()
    asyncio.run(main(args.pings, args.size))
