"""Cross-node latency of a peer's broadcast, through NATS and through a gateway.

    .venv/bin/python bench/mesh_latency.py [-n 500]

Starts the local three-region cluster (infra.cluster) on free ports twice: once with
every node on one nats-server (node -> NATS -> node), once as the supercluster
(us-east node -> us-east NATS -> gateway -> eu-west NATS -> eu-west node). Two raw
WebSocket peers (msgpack, as the real client speaks) join one channel; the sender sends
one `data` message at a time and the receiver's arrival time is taken in the same
process. Also measured: both peers on one node (no bus), as the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.cluster import Cluster, Ports


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _ssl() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


async def _peer(url: str, client_id: str, channel: str) -> ClientConnection:
    ws = await connect(f"{url.replace('https:', 'wss:')}?publickey=k&id={client_id}",
                       ssl=_ssl(), compression=None)
    await ws.send(_pack({"t": "control", "op": "channel_join", "c": channel,
                         "pl": _pack({"id": client_id})}))
    while True:
        m = msgpack.unpackb(await ws.recv())
        if m.get("op") == "channel_join":
            return ws


async def _next_data(ws: ClientConnection) -> dict[str, Any]:
    while True:
        m = msgpack.unpackb(await ws.recv())
        if m.get("t") == "data":
            return m


async def measure(url_a: str, url_b: str, n: int, channel: str) -> list[float]:
    a = await _peer(url_a, "sender", channel)
    b = await _peer(url_b, "receiver", channel)
    # Wait until the path works (interest propagated), then measure one at a time.
    for _ in range(200):
        await a.send(_pack({"t": "data", "c": channel,
                            "pl": _pack({"event": "warm", "data": "0"})}))
        try:
            await asyncio.wait_for(_next_data(b), 0.2)
            break
        except TimeoutError:
            continue
    samples = []
    for i in range(n):
        frame = _pack({"t": "data", "c": channel, "pl": _pack({"event": "t", "data": str(i)})})
        t0 = time.perf_counter()
        await a.send(frame)
        while True:
            m = await asyncio.wait_for(_next_data(b), 5)
            if msgpack.unpackb(m["pl"])["data"] == str(i):
                break
        samples.append(time.perf_counter() - t0)
        await asyncio.sleep(random.uniform(0.001, 0.003))
    await a.close()
    await b.close()
    return samples


def _report(what: str, samples: list[float]) -> None:
    s = sorted(samples)
    p = lambda q: s[min(len(s) - 1, int(q * len(s)))] * 1000  # noqa: E731
    print(f"{what:44} n={len(s)}  p50={p(0.50):.2f} ms  p90={p(0.90):.2f} ms  "
          f"p99={p(0.99):.2f} ms  mean={statistics.mean(s) * 1000:.2f} ms", flush=True)


def _ports() -> Ports:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from testkit.net import free_port_block

    base = free_port_block(12)
    return Ports(base, base + 3, base + 6, base + 9)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ports = _ports()
        one = f"nats://127.0.0.1:{ports.nats}"
        cluster = Cluster(Path(tmp) / "one", ports, node_env={"NATS_URL": one})
        cluster.up()
        try:
            _report("same node (no bus)", await measure(
                cluster.node_url("us-east"), cluster.node_url("us-east"), args.n, "c0"))
            _report("node -> one nats-server -> node", await measure(
                cluster.node_url("us-east"), cluster.node_url("eu-west"), args.n, "c1"))
        finally:
            cluster.down()
        cluster = Cluster(Path(tmp) / "super", _ports())
        cluster.up()
        try:
            _report("node -> nats -> gateway -> nats -> node", await measure(
                cluster.node_url("us-east"), cluster.node_url("eu-west"), args.n, "c2"))
        finally:
            cluster.down()


if __name__ == "__main__":
    asyncio.run(main())
