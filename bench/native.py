"""A native ceiling for fan-out: prscd vs Node.js ``ws`` vs ``websockets.broadcast``.

The same load as ``bench/fanout.py`` (one channel, one sender of 64-byte messages,
a window of messages in flight) against three servers in alternating rounds of one
run: prscd, the raw Python baseline (``bench/rawserver.py``) and a server that is not
Python: Node.js with the ``ws`` library (``bench/native/server.mjs``, same job: the
first message is the join, every later one goes unparsed to every other member).

Why ``ws`` and not uWebSockets.js: uWebSockets.js is published on GitHub only; the
``uwebsockets.js`` package on the npm registry is a third party's source tarball
whose build fetches the library from GitHub, which this machine cannot reach. ``ws``
is the most used WebSocket server for Node.js, installs from the registry alone, and
runs on V8 and libuv: a fair "no Python" ceiling for the same single-threaded job.

The figure that matters is node CPU seconds per 100k deliveries (the machine is
shared, rates drift); ``cpu_vs_native`` is prscd's divided by native's (goal: at most
2x with one message in flight).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

import msgpack

from bench.fanout import measure
from bench.procs import ROOT, Pool, Server, _wait_listening, free_port, start_node, start_raw

NATIVE = ROOT / "bench" / "native"
ACK = msgpack.packb({"t": "control", "op": "channel_join", "c": "bench", "mesh": "native"})


def ensure_installed() -> str | None:
    """Install the baseline's npm packages once; the reason it cannot run, or None."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        return "Node.js and npm are needed for the native baseline (apt-get install nodejs npm)"
    if not (NATIVE / "node_modules" / "ws").is_dir():
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                              cwd=NATIVE, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            return f"npm ci in bench/native failed: {done.stderr.strip()[-300:]}"
    return None


def start_native(log_dir: Path) -> Server:
    port = free_port()
    log_path = log_dir / f"native-ws-{port}.log"
    node = shutil.which("node") or "node"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([node, str(NATIVE / "server.mjs"), str(port), ACK.hex()],
                                stdout=log, stderr=subprocess.STDOUT, cwd=NATIVE,
                                env={**os.environ, "NODE_ENV": "production"})
    _wait_listening(proc, port, log_path)
    return Server("native-ws", proc, port, False, log_path)


SERVERS = ("prscd", "raw", "native")


def _start(which: str, log_dir: Path) -> Server:
    if which == "prscd":
        return start_node(log_dir)
    if which == "raw":
        return start_raw(log_dir, "broadcast")
    return start_native(log_dir)


def run(log_dir: Path, *, peers: int = 1000, rounds: int = 2, warmup: float = 1.5,
        duration: float = 4.0, windows: tuple[int, ...] = (1, 32),
        workers: int = 2) -> dict[str, Any]:
    why = ensure_installed()
    if why:
        return {"skipped": why}
    out: dict[str, Any] = {"peers": peers, "message_bytes": 64, "rounds": rounds,
                           "duration_s": duration, "baseline": "Node.js ws 8.23.0",
                           "windows": {}}
    with Pool(workers) as pool:
        for window in windows:
            detail: dict[str, list[dict[str, Any]]] = {k: [] for k in SERVERS}
            for r in range(rounds):
                # Rotate the order so drift on a shared machine hits all three alike.
                order = SERVERS[r % 3:] + SERVERS[:r % 3]
                for which in order:
                    server = _start(which, log_dir)
                    try:
                        detail[which].append(measure(
                            pool, server, peers=peers, size=64, warmup=warmup,
                            duration=duration, window=window, tag=f"n{which}{window}{r}"))
                    finally:
                        server.stop()
            row: dict[str, Any] = {"rounds_detail": detail}
            for which in SERVERS:
                row[f"{which}_deliveries_per_s"] = statistics.median(
                    x["deliveries_per_s"] for x in detail[which])
                row[f"{which}_cpu_s_per_100k"] = statistics.median(
                    x["server_cpu_s_per_100k"] for x in detail[which])
            row["cpu_vs_native"] = row["prscd_cpu_s_per_100k"] / row["native_cpu_s_per_100k"]
            row["cpu_vs_raw"] = row["prscd_cpu_s_per_100k"] / row["raw_cpu_s_per_100k"]
            row["ratio"] = row["prscd_deliveries_per_s"] / row["native_deliveries_per_s"]
            out["windows"][str(window)] = row
    one = out["windows"].get("1")
    if one is not None:
        out["ratio"] = one["ratio"]
        out["cpu_vs_native_one_in_flight"] = one["cpu_vs_native"]
    return out
