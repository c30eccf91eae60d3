"""The WebTransport idle-memory benchmark still runs (bench/ must not rot): 20 peers.

Not a performance test: ``python -m bench --only wt_memory --quick`` measures the node's
RSS per idle WebTransport and WebSocket peer (a fresh node per count, and one node grown
in steps: the first peer's cost apart from the slope) and where a WebTransport peer's
memory goes, and writes the rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wt_memory_benchmark_runs_and_reports_rows(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "wt_memory", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())["wt_memory"]
    assert "error" not in result, result
    rss = result["rss"]
    assert set(rss["kib_per_peer"]) == {"webtransport", "websocket"}
    for rounds in rss["detail"].values():
        assert rounds[0]["open"] == 20, rounds  # every peer still connected when measured
    assert 0 < rss["kib_per_peer"]["webtransport"] < 1000
    steps = result["steps"]  # one node from 0 to 20 peers: the first peer apart, the slope
    assert steps["peers"] == [1, 10, 20]
    for name in ("webtransport", "websocket"):
        case = steps[name]
        assert [r["open"] for r in steps["detail"][name]] == [20]
        assert case["first_peer_kib"] > 0
        assert set(case["slope_kib_per_peer"]) == {"10", "20"}
        assert 0 < case["slope_kib_per_peer"]["20"] < 1000
    assert steps["detail"]["webtransport"][0]["first_peer_by_mapping"]
    assert result["met"] == (rss["met"] and steps["met"])
    where = result["where"]
    assert where["connections_with_session"] == 20
    assert 5 < where["traced_kib_per_peer"] < 500
    assert any(part.startswith("aioquic/") for part in where["by_part_bytes_per_peer"])
    assert where["own_objects_bytes_per_connection"]["quic._streams"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "WebTransport idle memory (20 peers" in table
    assert "WebTransport idle memory, one node from 0 to 20 peers" in table
