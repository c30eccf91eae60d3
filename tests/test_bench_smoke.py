"""The benchmark commands still run (bench/ must not rot): seconds-long quick versions.

Not a performance test: it checks that ``python -m bench`` starts prscd and the raw
baseline as subprocesses, drives them from worker processes, and writes a JSON file
and a Markdown table with plausible numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick(name: str, out: Path, timeout: float = 110) -> dict:
    """``python -m bench --only NAME --quick``: exit 0; the whole results.json."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--only", name, "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_fanout_benchmark_runs_and_reports_sane_numbers(tmp_path: Path) -> None:
    results = quick("fanout", tmp_path)
    fan = results["fanout"]
    assert "error" not in fan, fan
    assert fan["tls"] is False and fan["peers"] == 200 and fan["message_bytes"] == 64
    for side in ("prscd", "raw"):
        rounds = fan["rounds_detail"][side]
        assert rounds and all(r["deliveries_per_s"] > 1000 for r in rounds), rounds
        assert all(r["messages_sent"] > 0 and r["closed"]["codes"] == {} for r in rounds)
    assert 0 < fan["ratio"] < 1000
    assert fan["prscd_cpu_s_per_100k"] > 0 and fan["raw_cpu_s_per_100k"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "fan-out, TLS off" in table and "websockets.broadcast" in table
    assert "CPUs" in table


def test_native_ceiling_benchmark_runs_all_three_servers(tmp_path: Path) -> None:
    nat = quick("native", tmp_path)["native"]
    assert "error" not in nat and "skipped" not in nat, nat
    assert set(nat["windows"]) == {"1", "32"}
    for row in nat["windows"].values():
        for side in ("prscd", "raw", "native"):
            rounds = row["rounds_detail"][side]
            assert rounds and all(r["deliveries_per_s"] > 1000 for r in rounds), (side, rounds)
            assert all(r["closed"]["codes"] == {} for r in rounds), (side, rounds)
        assert row["cpu_vs_native"] > 0 and row["ratio"] > 0
    assert "ratio" in nat
    assert "native ceiling" in (tmp_path / "results.md").read_text()


def test_workers_benchmark_runs_one_and_two_workers(tmp_path: Path) -> None:
    wk = quick("workers", tmp_path)["workers"]
    assert "error" not in wk and "skipped" not in wk, wk
    assert [x["transport"] for x in wk["rows"]] == ["websocket", "webtransport"]
    for x in wk["rows"]:
        assert x["deliveries_per_cpu_s_1"] > 0 and x["deliveries_per_cpu_s_2"] > 0, x
        assert len(x["worker_rss_idle_kib"]) == 2 and len(x["worker_rss_idle_kib_1"]) == 1, x
        assert x["lost_1"] == 0 and x["lost_2"] == 0, x
    assert "--workers 2 vs 1" in (tmp_path / "results.md").read_text()


def test_keepalive_benchmark_measures_both_transports_without_closes(tmp_path: Path) -> None:
    ka = quick("keepalive", tmp_path)["keepalive"]
    assert "error" not in ka, ka
    for transport, peers in (("websocket", 500), ("webtransport", 50)):
        x = ka[transport]
        assert "error" not in x and x["peers"] == peers, x
        for config in ("keepalive", "off"):
            for node in x["rounds_detail"][config]:
                # No false timeout: every peer open from connect to the end of the window.
                assert node["opened"] == node["open_start"] == node["open_end"] == peers, node
                assert node["clients_open"] == peers and node["closed_at_clients"] == {}, node
                assert not node["closed_by_node_connecting"], node
                assert not node["closed_by_node_window"], node
        # Pings cost the node something; off, an idle node spends (almost) nothing.
        assert x["us_per_peer_s_keepalive"] > 0, x
    assert "keepalive cost" in (tmp_path / "results.md").read_text()


def test_tracing_benchmark_measures_off_defaults_and_every_message(tmp_path: Path) -> None:
    tr = quick("tracing", tmp_path)["tracing"]
    assert "error" not in tr and "skipped" not in tr, tr
    assert tr["rounds"] == 3 and tr["peers"] == 200
    for config, rounds in tr["rounds_detail"].items():
        assert len(rounds) == 3 and all(r["lost"] == 0 and r["delivered"] > 0 for r in rounds)
        assert all(r["cpu_us_per_delivery"] > 0 for r in rounds), (config, rounds)
    # Spans reached the OTLP sink: every message at 100%, about 1% at the defaults.
    # (a round's last export can land in the next: not exactly 1)
    assert 0.9 <= tr["spans_per_message"]["all"] <= 1.1, tr["spans_per_message"]
    assert tr["spans_per_message"]["defaults"] < 0.1, tr["spans_per_message"]
    assert tr["ratio"] > 0 and tr["ratio_all"] > 0
    assert "tracing every message" in (tmp_path / "results.md").read_text()


def test_hostile_benchmark_runs_every_attack_and_the_node_closes_the_refused(
        tmp_path: Path) -> None:
    """Every attack ran against the node (an attacker within the limits that the node
    closed would have measured nothing: the bench raises), the probe measured each phase,
    and each refused attacker was closed (the 2 s goal itself is the full run's)."""
    from bench.hostile import REFUSED, WITHIN_LIMITS

    hostile = quick("hostile", tmp_path, timeout=240)["hostile"]  # (~55 s here)
    assert "error" not in hostile, hostile
    assert set(hostile["attacks"]) == set(WITHIN_LIMITS + REFUSED)
    for name, attack in hostile["attacks"].items():
        assert attack["quiet_p99_ms"] > 0 and attack["attack_p99_ms"] > 0, name
        if name in REFUSED:
            assert all(c is not None for c in attack["closed_after_s"]), (name, attack)
        else:
            assert attack["decoy_p99_ms"] > 0, name
    assert hostile["attacks"]["payload_1000"]["phases"]["attack"][0]["sent"] > 100
    assert hostile["attacks"]["half_open"]["phases"]["attack"][0]["connections"] == 300
    assert "hostile `half_open`" in (tmp_path / "results.md").read_text()
