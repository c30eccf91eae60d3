"""``prscd --workers N``: N processes on one port, each a mesh member, one supervisor."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgpack
from websockets.asyncio.client import connect

from tests.helpers import data_frame, join_frame
from tests.mesh_helpers import NatsServer, free_port, free_port_block, port_open, wait_sync

ROOT = Path(__file__).resolve().parents[2]


def prscd(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "PORT", "TLS")}
    full.update({"HOST": "127.0.0.1", "TLS": "false", "PID_FILE": str(tmp_path / "prscd.pid"),
                 "HEARTBEAT_INTERVAL": "0.5", "NODE_TIMEOUT": "2"}, **env)
    return subprocess.Popen([sys.executable, "-m", "node", "--env-file", os.devnull, *args],
                            env=full, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
        return json.loads(resp.read())


def test_workers_need_the_bus(tmp_path: Path) -> None:
    proc = prscd(tmp_path, "--workers", "2", PORT=str(free_port()))
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 2 and b"needs NATS_URL" in out


async def test_workers_share_the_port_and_meet_through_the_mesh(
        tmp_path: Path, nats_server: NatsServer) -> None:
    port = free_port()
    proc = prscd(tmp_path, "--workers", "2", PORT=str(port), NATS_URL=nats_server.url)
    try:
        wait_sync(lambda: port_open(port), 20, "workers to listen")
        # New connections land on both workers (the kernel hashes the 4-tuple).
        wait_sync(lambda: len({health(port)["node_id"] for _ in range(20)}) == 2, 20,
                  "two distinct workers answering")
        wait_sync(lambda: health(port)["mesh"]["nodes_alive"] >= 1, 20, "workers to meet")
        n = 16
        peers = []
        for i in range(n):
            ws = await connect(f"ws://127.0.0.1:{port}/v1?publickey=k&id=p{i}")
            await ws.send(join_frame("room", f"p{i}"))
            assert msgpack.unpackb(await ws.recv())["op"] == "channel_join"
            peers.append(ws)
        # Both workers hold some of them (all 16 on one worker: p = 2**-15).
        seen = {}
        deadline = time.monotonic() + 20
        while len(seen) < 2 and time.monotonic() < deadline:
            h = health(port)
            seen[h["node_id"]] = h["peers"]
        assert len(seen) == 2 and sum(seen.values()) == n and min(seen.values()) > 0, seen
        await asyncio.sleep(0.5)  # interest of both workers on the bus
        await peers[0].send(data_frame("room", "hello", '"all"'))
        for ws in peers[1:]:
            while True:
                msg = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10))
                if msg["t"] == "data":
                    assert msg["p"] == "p0"
                    break
        for ws in peers:
            await ws.close()

        # A worker that dies is restarted; the supervisor's pid file stays.
        pid_file = tmp_path / "prscd.pid"
        assert int(pid_file.read_text()) == proc.pid
        worker0 = int((tmp_path / "prscd.pid.0").read_text())
        os.kill(worker0, signal.SIGKILL)
        wait_sync(lambda: (tmp_path / "prscd.pid.0").exists()
                  and int((tmp_path / "prscd.pid.0").read_text() or 0) not in (0, worker0),
                  20, "worker 0 to be restarted")
        # SIGHUP reaches the workers (each reloads its keys) and the supervisor survives it.
        proc.send_signal(signal.SIGHUP)
        wait_sync(lambda: health(port)["status"] == "ok", 10, "workers still serving")
        assert proc.poll() is None
        # SIGTERM to the supervisor stops every worker and removes the pid files.
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out[-2000:]
        assert out.count(b"SIGHUP: no PUBLIC_KEYS_FILE to reload") == 2, out[-3000:]
        assert not port_open(port)
        assert not pid_file.exists() and not (tmp_path / "prscd.pid.1").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


async def test_every_worker_has_its_own_metrics_port(
        tmp_path: Path, nats_server: NatsServer) -> None:
    port, metrics = free_port(), free_port_block(2)
    proc = prscd(tmp_path, "--workers", "2", PORT=str(port), NATS_URL=nats_server.url,
                 METRICS_PORT=str(metrics))
    try:
        wait_sync(lambda: port_open(metrics) and port_open(metrics + 1), 20, "metrics ports")
        n = 12
        peers = [await connect(f"ws://127.0.0.1:{port}/v1?publickey=k&id=p{i}")
                 for i in range(n)]
        # Worker n answers on METRICS_PORT+n: two node ids, and the peers add up (both
        # hold some: all 12 on one worker has p = 2**-11).
        def workers() -> tuple[set[str], list[float]]:
            ids, held = set(), []
            for p in (metrics, metrics + 1):
                samples = scrape(p)
                ids |= {dict(labels)["node_id"] for name, labels in samples
                        if name == "prscd_build_info"}
                held.append(samples["prscd_peers", frozenset()])
            return ids, held

        wait_sync(lambda: sum(workers()[1]) == n, 10, "every peer counted by a worker")
        ids, held = workers()
        assert len(ids) == 2 and sum(held) == n and min(held) > 0, (ids, held)
        for ws in peers:
            await ws.close()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
