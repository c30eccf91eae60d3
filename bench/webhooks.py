"""Webhook delivery under a join load: raw peers join and leave channels at ``rate`` joins/s.

``peers`` connections (one id each) stay open; every 1/``rate`` s one of them joins a
channel (``channels`` of them in turn) and leaves it ``hold`` s later, so the node makes
one ``member_joined`` and one ``member_left`` per join (``WEBHOOK_GRACE=0``: nothing held).
A local receiver (aiohttp.web, its own process) checks every signature and notes when each
event arrives. Measured, alternating webhooks off and on (``rounds`` pairs):

- the join path: join sent -> ack read, p50/p99, and the node's CPU per join;
- with webhooks on: join sent -> its ``member_joined`` at the receiver, p50/p99 (the batch
  window is 1 s, or 100 events); batches/s; events delivered, dropped; the node's CPU per
  event (all of its CPU over the events), and what webhooks add per event (on - off).

Generator, receiver and node are separate processes; timestamps are CLOCK_MONOTONIC, which
all processes on one machine share.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import multiprocessing as mp
import statistics
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack

from bench.procs import Server, free_port, start_node

SECRET = "bench-secret"


def percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    s = sorted(xs)

    def pick(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 3)

    return {"n": len(s), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": pick(1.0)}


# -- the receiver (its own process) ----------------------------------------------------------


def _receiver_main(conn: Connection, port: int) -> None:
    asyncio.run(_receive(conn, port))


async def _receive(conn: Connection, port: int) -> None:
    from aiohttp import web

    arrivals: dict[str, list[float]] = {}  # "user channel" -> member_joined arrival times
    batches: list[float] = []
    counts = {"events": 0, "bad_signatures": 0}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic()
        parts = dict(p.split("=", 1) for p in request.headers["X-Prscd-Signature"].split(","))
        mac = hmac.new(SECRET.encode(), parts["t"].encode() + b"." + body, hashlib.sha256)
        if not hmac.compare_digest(mac.hexdigest(), parts["v1"]):
            counts["bad_signatures"] += 1
            return web.Response(status=401)
        batches.append(now)
        for e in json.loads(body)["events"]:
            counts["events"] += 1
            if e["type"] == "member_joined":
                arrivals.setdefault(f"{e['user_id']} {e['channel']}", []).append(now)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    loop = asyncio.get_running_loop()
    conn.send("ready")
    while True:
        msg = await loop.run_in_executor(None, conn.recv)
        if msg == "results":
            conn.send({"arrivals": arrivals, "batches": batches, **counts})
            arrivals, batches = {}, []
            counts.update(events=0, bad_signatures=0)
        else:
            break
    await runner.cleanup()


# -- the load (its own process) --------------------------------------------------------------


def _generator_main(conn: Connection, kw: dict[str, Any]) -> None:
    try:
        import uvloop
    except ImportError:
        conn.send(asyncio.run(_load(conn, **kw)))
    else:
        conn.send(uvloop.run(_load(conn, **kw)))


async def _load(conn: Connection, port: int, peers: int, rate: float, duration: float,
                hold: float, channels: int) -> dict[str, Any]:
    from bench.clients import control_frame, join_frame
    from bench.wsclient import WSPeer

    acked: list[float] = []
    sent: dict[str, list[float]] = {}
    pending: dict[tuple[str, str], float] = {}

    def on_message(peer: WSPeer, payload: bytes) -> None:
        msg = msgpack.unpackb(payload)
        if msg.get("op") == "channel_join":
            t0 = pending.pop((peer.client_id, msg["c"]), None)
            if t0 is not None:
                acked.append(time.monotonic() - t0)

    sem = asyncio.Semaphore(50)

    async def connect(i: int) -> WSPeer:
        async with sem:
            return await WSPeer.connect("127.0.0.1", port, WSPeer.v1_path(f"wh-{i}"),
                                        f"wh-{i}", on_message=on_message)

    conns = await asyncio.gather(*(connect(i) for i in range(peers)))
    loop = asyncio.get_running_loop()
    conn.send("connected")  # the node's CPU is read from here: the joins and leaves only
    await loop.run_in_executor(None, conn.recv)
    total = int(rate * duration)
    start = loop.time() + 0.2
    t_first = time.monotonic() + 0.2
    for j in range(total):
        delay = start + j / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        peer = conns[j % peers]
        channel = f"room-{(j // peers) % channels}"
        now = time.monotonic()
        pending[(peer.client_id, channel)] = now
        sent.setdefault(f"{peer.client_id} {channel}", []).append(now)
        peer.send(join_frame(channel, peer.client_id))
        loop.call_later(hold, peer.send, control_frame("peer_offline", channel))
    await asyncio.sleep(hold + 0.5)
    t_last = time.monotonic()
    for peer in conns:
        peer.close()
    return {"joins": total, "acked": acked, "sent": sent, "unacked": len(pending),
            "seconds": t_last - t_first}


def _spawn(target: Any, *args: Any) -> tuple[Any, Connection]:
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    child.close()
    return proc, parent


# -- one run, and the benchmark ----------------------------------------------------------------


def _one(log_dir: Path, *, on: bool, rx: Connection | None, rx_port: int,
         kw: dict[str, Any], name: str) -> dict[str, Any]:
    env = {"WEBHOOK_URL": f"http://127.0.0.1:{rx_port}/hook", "WEBHOOK_SECRET": SECRET,
           "WEBHOOK_GRACE": "0"} if on else {}
    server: Server = start_node(log_dir, name=name, env=env)
    try:
        gen, conn = _spawn(_generator_main, {"port": server.port, **kw})
        if not conn.poll(120):
            raise RuntimeError("the load generator did not connect")
        conn.recv()
        cpu0 = server.cpu_seconds()
        conn.send("go")
        if not conn.poll(kw["duration"] * 4 + 120):
            raise RuntimeError("the load generator did not finish")
        load = conn.recv()
        gen.join(5)
        if on:  # every member_joined delivered (or given up) before counting
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                m = server.metrics()
                if not m.get("prscd_webhook_queued", 0) and not m.get("prscd_webhook_held", 0):
                    break
                time.sleep(0.2)
        time.sleep(1.5)  # the last batch (its window) arrives; the same idle time when off
        cpu = server.cpu_seconds() - cpu0
        metrics = server.metrics()
    finally:
        server.stop()
    out: dict[str, Any] = {
        "joins": load["joins"], "unacked": load["unacked"],
        "ack": percentiles(load["acked"]),
        "node_cpu_s": round(cpu, 3),
        "node_cpu_ms_per_join": round(cpu / load["joins"] * 1000, 4),
        "dropped": {k.split('"')[1]: int(v) for k, v in metrics.items()
                    if k.startswith("prscd_dropped_total")},
    }
    if on and rx is not None:
        rx.send("results")
        got = rx.recv()
        delays = []
        for key, times in load["sent"].items():
            for t_sent, t_got in zip(times, got["arrivals"].get(key, []), strict=False):
                delays.append(t_got - t_sent)
        span = (max(got["batches"]) - min(got["batches"])) if len(got["batches"]) > 1 else 0
        out.update({
            "delivery": percentiles(delays),
            "events_delivered": got["events"], "bad_signatures": got["bad_signatures"],
            "batches": len(got["batches"]),
            "batches_per_s": round(len(got["batches"]) / span, 1) if span else None,
            "events_per_batch": round(got["events"] / max(1, len(got["batches"])), 1),
            "node_cpu_ms_per_event": round(cpu / max(1, got["events"]) * 1000, 4),
            "batches_retried": int(metrics.get("prscd_webhook_batches_retried_total", 0)),
            "batches_failed": int(metrics.get("prscd_webhook_batches_failed_total", 0)),
        })
    return out


def run(log_dir: Path, *, rate: float = 500.0, duration: float = 10.0, peers: int = 500,
        hold: float = 0.5, channels: int = 10, rounds: int = 2) -> dict[str, Any]:
    kw = {"peers": peers, "rate": rate, "duration": duration, "hold": hold,
          "channels": channels}
    rx_port = free_port()
    rx_proc, rx = _spawn(_receiver_main, rx_port)
    if not rx.poll(30):
        raise RuntimeError("the webhook receiver did not start")
    rx.recv()
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    try:
        for i in range(rounds):
            for mode in ("off", "on"):
                runs[mode].append(_one(log_dir, on=mode == "on", rx=rx, rx_port=rx_port,
                                       kw=kw, name=f"prscd-webhooks-{mode}-{i}"))
    finally:
        rx.send("stop")
        rx_proc.join(5)
        if rx_proc.is_alive():
            rx_proc.kill()

    def med(mode: str, *path: str) -> float:
        values = []
        for r in runs[mode]:
            v: Any = r
            for p in path:
                v = v[p]
            values.append(v)
        return statistics.median(values)

    off_cpu, on_cpu = med("off", "node_cpu_ms_per_join"), med("on", "node_cpu_ms_per_join")
    return {
        **kw, "rounds": rounds,
        "delivery_p50_ms": med("on", "delivery", "p50_ms"),
        "delivery_p99_ms": med("on", "delivery", "p99_ms"),
        "batches_per_s": med("on", "batches_per_s"),
        "events_per_batch": med("on", "events_per_batch"),
        "node_cpu_ms_per_event": med("on", "node_cpu_ms_per_event"),
        "ack_p50_ms_off": med("off", "ack", "p50_ms"), "ack_p50_ms_on": med("on", "ack", "p50_ms"),
        "ack_p99_ms_off": med("off", "ack", "p99_ms"), "ack_p99_ms_on": med("on", "ack", "p99_ms"),
        "node_cpu_ms_per_join_off": off_cpu, "node_cpu_ms_per_join_on": on_cpu,
        "cpu_ratio_on_vs_off": round(on_cpu / off_cpu, 3) if off_cpu else None,
        # What webhooks add per event (two per join), within the noise of the two medians.
        "webhook_cpu_ms_per_event_added": round(
            (on_cpu - off_cpu) * kw["rate"] * kw["duration"]
            / max(1, med("on", "events_delivered")), 4),
        "runs": runs,
    }
