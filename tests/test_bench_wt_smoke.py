"""The WebTransport fan-out benchmark still runs (bench/ must not rot): seconds, 20 peers.

Not a performance test: it checks that ``python -m bench --only webtransport --quick``
drives aioquic receivers and WebSocket receivers against one node and reports each row
with its WebSocket baseline, a ratio, CPU per 100k deliveries and idle KiB per peer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_webtransport_fanout_benchmark_runs_and_reports_rows(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "webtransport", "--quick",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wt = json.loads((tmp_path / "results.json").read_text())["webtransport"]
    assert "error" not in wt, wt
    assert [(x["receivers"], x["window"]) for x in wt["rows"]] == [(20, 1), (20, 8)]
    for x in wt["rows"]:
        assert x["wt_deliveries_per_s"] > 100 and x["ws_deliveries_per_s"] > 100, x
        assert x["wt_cpu_s_per_100k"] > 0 and x["ws_cpu_s_per_100k"] > 0, x
        assert x["ratio"] == x["wt_cpu_s_per_100k"] / x["ws_cpu_s_per_100k"]
        assert x["ws_lost"] == 0, x  # WebSocket is reliable: a loss is a bench bug
    for detail in wt["rounds_detail"]["20"].values():
        assert detail[0]["closed"] == 0, detail[0]
    (memory,) = wt["memory"]
    assert 0 < memory["wt_kib_per_peer"] < 1000 and 0 < memory["ws_kib_per_peer"] < 1000
    assert "WebTransport fan-out (20 receivers, 1 in flight" in (tmp_path / "results.md").read_text()
