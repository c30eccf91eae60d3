"""Join storm: N peers join one channel at once, behaving like the real client.

Each peer sends ``channel_join``; on the ack it sends ``peer_online`` and
``peer_state``; it answers every ``peer_online`` with ``peer_state``; it lists a member
once that member's ``peer_state`` arrived. Measured: the time from the joins going
out until every peer lists all N-1 others, and the frames the node handled and
delivered (from its /metrics). Because every ``peer_online`` is answered to the
whole channel, deliveries grow as N^3/2: this is the protocol's cost, not the node's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.procs import Pool, start_node


def run(log_dir: Path, *, peers: int = 500, workers: int = 2, timeout: float = 900.0,
        tls: bool = False, env: dict[str, str] | None = None) -> dict[str, Any]:
    ids = [f"storm-{i}" for i in range(peers)]
    parts = [ids[i::workers] for i in range(workers)]
    with Pool(workers) as pool:
        server = start_node(log_dir, tls=tls, name="prscd-storm", env=env)
        try:
            pool.call_all("storm_connect", port=server.port, tls=tls,
                          per_worker=lambda i: {"ids": parts[i],
                                                "sources": [f"127.0.0.{1 + i}"]})
            before = server.metrics()
            cpu0 = server.cpu_seconds()
            start_at = time.monotonic() + 0.5
            results = pool.call_all("storm_go", total=peers, start_at=start_at,
                                    timeout=timeout, timeout_=timeout + 60)
            cpu1 = server.cpu_seconds()
            after = server.metrics()
            # Then until the node is idle: every queued frame delivered (or dropped).
            rss_max = server.rss_kib()
            last, idle_at = -1.0, time.monotonic()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                received = sum(s["count"] for s in pool.call_all("snapshot"))
                rss_max = max(rss_max, server.rss_kib())
                if received == last:
                    break
                last, idle_at = received, time.monotonic()
                time.sleep(0.5)
            quiet = server.metrics()
            cpu2 = server.cpu_seconds()
            rss = server.rss_kib()
            codes = pool.call_all("open_count")
            pool.call_all("close_all")
        finally:
            server.stop()
    finished = sum(r["finished"] for r in results)
    elapsed = max(r["done_at"] for r in results) - start_at
    handled = after["prscd_frames_handled_total"] - before["prscd_frames_handled_total"]
    delivered = after["prscd_frames_delivered_total"] - before["prscd_frames_delivered_total"]
    return {
        "peers": peers, "tls": tls, "client_workers": workers,
        "all_listed": finished == peers, "peers_done": finished,
        "seconds_until_all_listed": elapsed if finished == peers else None,
        "frames_handled_until_listed": int(handled),
        "frames_delivered_until_listed": int(delivered),
        "frames_handled": int(quiet["prscd_frames_handled_total"]
                              - before["prscd_frames_handled_total"]),
        "frames_received_by_clients": sum(r["frames"] for r in results),
        "deliveries_per_s": delivered / elapsed if elapsed > 0 else None,
        "server_cpu_s": cpu1 - cpu0,
        "seconds_until_node_idle": idle_at - start_at,
        "frames_delivered_until_idle": int(quiet["prscd_frames_delivered_total"]
                                           - before["prscd_frames_delivered_total"]),
        "frames_received_until_idle": int(last),
        "server_cpu_s_until_idle": cpu2 - cpu0,
        "server_rss_kib_max": rss_max, "server_rss_kib_idle": rss,
        "dropped": {k.split('"')[1]: int(v) for k, v in quiet.items()
                    if k.startswith("prscd_dropped_total")},
        "closed_peers": sum(c["closed"] for c in codes),
    }
