"""The Grafana dashboard, the Prometheus scrape config and alert rules (infra/grafana/,
infra/prometheus/) and their docker-compose services, checked without Docker.

With promtool (Debian's `prometheus` package; scripts/test installs it) the config and the
rules are checked by it, the rules' unit tests (infra/prometheus/alerts_test.yml) run, and
every dashboard expression is parsed by it (as a recording rule). Without it those tests
skip, saying so; the structural checks run either way. Every metric name used anywhere
must be one the node serves: in the real /metrics of a node, or listed in docs/metrics.md.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import RunningNode
from tests.helpers import get

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "infra" / "prometheus"
GRAFANA = ROOT / "infra" / "grafana"
DASHBOARD = json.loads((GRAFANA / "prscd.json").read_text())
CONFIG = yaml.safe_load((PROM / "prometheus.yml").read_text())
RULES = yaml.safe_load((PROM / "alerts.yml").read_text())
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
#: On PATH, or where scripts/test puts it (taken out of Debian's package).
PROMTOOL = shutil.which("promtool") or shutil.which("promtool", path=str(ROOT / ".venv" / "bin"))
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="no promtool (scripts/test puts it in .venv/bin): "
                             "structural checks only")


def panels() -> list[dict[str, Any]]:
    return [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in RULES["groups"] for r in g["rules"]}


# -- metric names ------------------------------------------------------------------------

#: PromQL words that are not metric names (functions are recognised by their '(').
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "offset", "bool", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are neither functions,
    keywords, label names (in {...} or after by/on/...), nor inside strings or [ranges]."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        if m.group(2) or m.group(1).lower() in KEYWORDS:
            continue
        names.add(m.group(1))
    return names


def test_metric_names_are_found_in_expressions() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, origin) (rate(prscd_x_bucket{a="b c"}[5m])))'
            ' > 0.5 unless prscd_y * on (job, instance) group_left (mesh_id) prscd_z'
            ' or vector(0) and up{job="prscd"} offset 5m')
    assert metric_names(expr) == {"prscd_x_bucket", "prscd_y", "prscd_z", "up"}


def documented() -> tuple[set[str], set[str]]:
    """(names, prefixes) listed in docs/metrics.md: `prscd_x` and `process_*`."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    words = set(re.findall(r"`([a-z_:][a-z0-9_:]*\*?)`", text))
    return ({w for w in words if not w.endswith("*")},
            {w[:-1] for w in words if w.endswith("*")})


def served(name: str, names: set[str], prefixes: set[str]) -> bool:
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return (name in names or base in names or name == "up"  # up: Prometheus's own
            or any(name.startswith(p) for p in prefixes))


async def test_every_metric_used_is_served_or_documented(node: RunningNode) -> None:
    status, _, body = await get(f"https://127.0.0.1:{node.port}/metrics")
    assert status == 200
    real = {line.split("{")[0].split()[0] for line in body.decode().splitlines()
            if line and not line.startswith("#")}
    names, prefixes = documented()
    names |= real
    used = {n: where for where, exprs in (("dashboard", dashboard_exprs()),
                                          ("alerts", [r["expr"] for r in alerts().values()]))
            for e in exprs for n in metric_names(e)}
    assert "prscd_mesh_delivery_seconds_bucket" in used and "prscd_dropped_total" in used
    unknown = sorted(f"{n} ({where})" for n, where in used.items()
                     if not served(n, names, prefixes))
    assert not unknown, f"not in /metrics nor docs/metrics.md: {unknown}"


# -- the dashboard -----------------------------------------------------------------------


def test_the_dashboard_parses_and_has_what_an_operator_looks_for() -> None:
    assert DASHBOARD["uid"] == "prscd-mesh" and DASHBOARD["title"]
    titles = {p["title"]: p for p in panels()}
    for wanted in ("Nodes alive", "Nodes dead (10 min)", "Peers per region",
                   "Mesh delivery latency p50 / p99", "Drops by reason"):
        assert wanted in titles, wanted
    delivery = [t["expr"] for t in titles["Mesh delivery latency p50 / p99"]["targets"]]
    assert [e.split(",")[0] for e in delivery] == ["histogram_quantile(0.5",
                                                   "histogram_quantile(0.99"]
    assert "by (mesh_id)" in titles["Peers per region"]["targets"][0]["expr"]
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    # The data source is a variable: works provisioned here and imported elsewhere.
    [var] = [v for v in DASHBOARD["templating"]["list"] if v["type"] == "datasource"]
    for p in panels():
        assert p["datasource"]["uid"] == "${" + var["name"] + "}", p["title"]
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]


def test_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{p['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = p["title"]


@needs_promtool
def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": e.replace("$__rate_interval", "1m")}
        for i, e in enumerate(dashboard_exprs())]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    promtool("check", "rules", str(path))


# -- Prometheus --------------------------------------------------------------------------


def test_the_scrape_config_scrapes_the_three_compose_nodes() -> None:
    [job] = [j for j in CONFIG["scrape_configs"] if j["job_name"] == "prscd"]
    assert job["scheme"] == "https" and job["metrics_path"] == "/metrics"
    targets = {t: c["labels"]["region"] for c in job["static_configs"] for t in c["targets"]}
    nodes = {name: s for name, s in COMPOSE.items() if name.startswith("prscd-")}
    assert len(nodes) == 3
    for name, service in nodes.items():
        target = f"{name}:{service['environment']['PORT']}"
        assert targets[target] == service["environment"]["MESH_ID"]
    assert CONFIG["rule_files"] == ["alerts.yml"]


def test_the_alert_rules_cover_the_issue() -> None:
    rules = alerts()
    for name in ("PrscdNodeDown", "PrscdBusDown", "PrscdDropsRising",
                 "PrscdMeshDeliveryLatencyHigh"):
        assert name in rules, name
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    assert "prscd_mesh_delivery_seconds_bucket" in rules["PrscdMeshDeliveryLatencyHigh"]["expr"]
    assert "histogram_quantile(0.99" in rules["PrscdMeshDeliveryLatencyHigh"]["expr"]
    # Every alert has a case in the promtool unit tests (infra/prometheus/alerts_test.yml).
    tested = {t["alertname"] for case in yaml.safe_load(
        (PROM / "alerts_test.yml").read_text())["tests"] for t in case["alert_rule_test"]}
    assert tested == set(rules)


def promtool(*args: str, cwd: Path = PROM) -> str:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@needs_promtool
def test_promtool_checks_config_and_rules() -> None:
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in promtool("check", "rules", "alerts.yml")


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


# -- docker-compose ----------------------------------------------------------------------


def mounts(service: str) -> dict[str, Path]:
    """container path -> host path, for the service's bind mounts."""
    out = {}
    for v in COMPOSE[service]["volumes"]:
        host, container = v.split(":")[:2]
        out[container] = (ROOT / host).resolve()
    return out


def test_compose_runs_prometheus_and_grafana_provisioned_on_loopback() -> None:
    for name, port in (("prometheus", 9090), ("grafana", 3000)):
        assert COMPOSE[name]["ports"] == [f"127.0.0.1:{port}:{port}/tcp"], name
    prom = mounts("prometheus")
    assert prom["/etc/prometheus/prometheus.yml"] == PROM / "prometheus.yml"
    assert prom["/etc/prometheus/alerts.yml"] == PROM / "alerts.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in COMPOSE["prometheus"]["command"]

    graf = mounts("grafana")
    provisioning = graf["/etc/grafana/provisioning"]
    assert provisioning == GRAFANA / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "prscd.yml").read_text())[
        "providers"]
    folder = provider["options"]["path"]
    assert graf[f"{folder}/prscd.json"] == GRAFANA / "prscd.json"
    home = COMPOSE["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{folder}/prscd.json"
