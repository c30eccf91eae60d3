"""The soak in short (bench/soak.py): a three-region cluster, 150 raw protocol peers in two
client processes, joins, leaves, vanishing peers, states and broadcasts, one NATS restart
and one node kill -9 + restart; nothing lost in steady state, nobody stale at the end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_short_soak_loses_nothing_and_leaves_nobody_stale(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--minutes", "1.1", "--peers", "150",
         "--procs", "2", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=280)
    report = json.loads((tmp_path / "soak.json").read_text())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    expected, lost = report["deliveries_expected"], report["deliveries_lost"]
    assert report["messages_sent"] > 300 and expected.get("steady", 0) > 1000
    assert lost.get("steady", 0) == 0 and report["duplicates"] == 0
    assert [f["name"].split(" (")[0] for f in report["faults"]] == [
        "nats restart", "node kill -9 + restart"]
    for window, n in lost.items():  # at-most-once across a fault: counted and bounded
        assert n <= 0.05 * expected[window], (window, n, expected[window])
    presence = report["presence"]
    assert (presence["stale_members"], presence["missing_members"], presence["stale_states"],
            presence["steady_not_joined_at_end"]) == (0, 0, 0, 0), presence
    assert report["node_log"]["error_lines"] == 0, report["node_log"]["errors"]
    assert report["client_counts"]["churn_leaves"] and report["client_counts"]["churn_aborts"]
    # RSS of each node process: VmRSS and RssAnon, measured under load (docs/soak.md).
    assert len(report["rss"]) == 4, [r["region"] for r in report["rss"]]
    for row in report["rss"]:
        assert row["end_kib"] >= row["anon_end_kib"] > 0, row["region"]
