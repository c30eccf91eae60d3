"""What a WebTransport peer costs the node after the node closed it for a flood (issue 15).

``python -m bench.wt_after_close [--rounds 3] [--before DIR]``

A client floods data frames (datagrams, or one stream) until its close capsule (1008,
``RATE_LIMIT=10``), then goes on for 4 s as an attacker ignoring the close: its aioquic
connection sends while it can, and its last 1-RTT packets are sent again raw each loop
turn (:class:`testkit.wt_client.ReplayingClient`). Node CPU (from /proc) over those 4 s,
and over 4 quiet seconds before; then, as the floor any UDP sender sets, the same
packets with a connection id nobody has. ``--before DIR``: a second node whose ``node``
package comes from DIR (a checkout before the change), rounds alternating between them.
Prints one JSON line per run and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procs import Server, cpu_seconds, start_node
from testkit.frames import data_frame, join_frame
from testkit.wt_client import ReplayingClient, open_client

PHASE = 4.0
ENV = {"WEBTRANSPORT": "true", "RATE_LIMIT": "10", "RATE_BURST": "10"}


def _flood(wt: ReplayingClient, mode: str, frame: bytes) -> None:
    if wt.terminated is not None:
        return
    if mode == "datagram":
        for _ in range(50):
            wt.h3.send_datagram(wt.session_id, frame)
        wt.transmit()
    else:
        wt.send_stream(frame * 50)


async def _phase(pid: int, step: Any) -> tuple[float, float]:
    """Node CPU over PHASE seconds while ``step()`` runs every loop turn; and the time."""
    cpu, started = cpu_seconds(pid), time.monotonic()
    while time.monotonic() - started < PHASE:
        step()
        await asyncio.sleep(0.001)
    return cpu_seconds(pid) - cpu, time.monotonic() - started


async def run_once(server: Server, mode: str) -> dict[str, Any]:
    frame = data_frame("room", "x", "y" * 40)
    wt = await open_client(server.port, "/v1?publickey=k&id=flooder",
                           client_class=ReplayingClient)
    try:
        wt.send_datagram(join_frame("room", "flooder"))
        await wt.next_message(match=lambda m: m.get("op") == "channel_join")
        quiet, _ = await _phase(server.pid, lambda: None)
        started = time.monotonic()
        while wt.close_capsule is None and time.monotonic() - started < 10:
            _flood(wt, mode, frame)
            await asyncio.sleep(0.001)
        closed_after = time.monotonic() - started
        sent = wt.packets

        def flood_on() -> None:
            _flood(wt, mode, frame)
            wt.replay(20)

        after, _ = await _phase(server.pid, flood_on)
        packets = wt.packets - sent
        gone = wt.terminated is not None
        sent = wt.packets
        floor, _ = await _phase(server.pid, lambda: wt.replay(20, connection_id=os.urandom(8)))
        floor_packets = wt.packets - sent
    finally:
        wt.vanish()
    return {"mode": mode, "capsule": wt.close_capsule, "closed_after_s": round(closed_after, 3),
            "quiet_cpu_s": round(quiet, 3), "after_close_cpu_s": round(after, 3),
            "after_close_packets": packets, "connection_closed": gone,
            "us_per_packet": round(after / max(packets, 1) * 1e6, 1),
            "floor_us_per_packet": round(floor / max(floor_packets, 1) * 1e6, 1)}


async def main(rounds: int, before: str | None) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="wt-after-close-"))
    nodes = {"after": start_node(log_dir, tls=True, name="wt-after", env=ENV)}
    if before:
        nodes["before"] = start_node(log_dir, tls=True, name="wt-before",
                                     env={**ENV, "PYTHONPATH": before})
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        for r in range(rounds):
            for mode in ("datagram", "stream"):
                order = list(nodes) if r % 2 == 0 else list(reversed(nodes))
                for name in order:
                    result = await run_once(nodes[name], mode)
                    runs.setdefault((mode, name), []).append(result)
                    print(json.dumps({"node": name, **result}), flush=True)
    finally:
        for server in nodes.values():
            server.proc.terminate()
            server.proc.wait(10)
    for (mode, name), results in runs.items():
        keys = ("quiet_cpu_s", "after_close_cpu_s", "after_close_packets", "us_per_packet",
                "floor_us_per_packet")
        print(json.dumps({"median": f"{mode} {name}", "rounds": len(results),
                          **{k: statistics.median(x[k] for x in results) for k in keys}}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", help="a directory holding the node package to compare")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.before))
