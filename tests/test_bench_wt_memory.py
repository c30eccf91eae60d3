"""The WebTransport idle-memory benchmark still runs (bench/ must not rot): 20 peers.

Not a performance test: ``python -m bench --only wt_memory --quick`` measures the node's
RSS per idle WebTransport and WebSocket peer and where a WebTransport peer's memory
goes, and writes both rows.
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
    where = result["where"]
    assert where["connections_with_session"] == 20
    assert 5 < where["traced_kib_per_peer"] < 500
    assert any(part.startswith("aioquic/") for part in where["by_part_bytes_per_peer"])
    assert where["own_objects_bytes_per_connection"]["quic._streams"] > 0
    assert "WebTransport idle memory (20 peers" in (tmp_path / "results.md").read_text()
