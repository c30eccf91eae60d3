"""docker-compose.yml checked without Docker: parsed, cross-checked with infra/ and the code.

No Docker engine runs here, so each claim the file makes is checked against something
real: the NATS config is validated by the real nats-server with each service's
environment, node settings by the real Settings parser, the image's HEALTHCHECK command
is run against a real node.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from infra.cluster import REGIONS, nats_server_bin
from infra.composefile import (
    context_files,
    ignore_regex,
    ignored,
    load_yaml,
    parse_dockerfile,
    parse_port,
)
from mesh.tracing import resolve_endpoint
from node.config import Settings
from tests.conftest import NodeFactory

ROOT = Path(__file__).resolve().parents[1]
# compose refuses a file with a key twice; PyYAML's safe_load would keep the last one.
COMPOSE = load_yaml((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def env_of(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in SERVICES[service].get("environment", {}).items()}


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    return parts.hostname, parts.port


def test_three_regions_each_with_nats_and_a_node() -> None:
    assert REGIONS == ("us-east", "eu-west", "ap-south")
    for region in REGIONS:
        assert f"nats-{region}" in SERVICES and f"prscd-{region}" in SERVICES
        assert env_of(f"nats-{region}")["NATS_REGION"] == region
        assert env_of(f"prscd-{region}")["MESH_ID"] == region
    assert "jaeger" in SERVICES


@pytest.mark.parametrize("region", REGIONS)
def test_nats_config_is_the_one_infra_uses_and_valid_with_this_environment(region: str) -> None:
    service = SERVICES[f"nats-{region}"]
    # Read-only, and relabelled for SELinux hosts (z), or the container cannot read it.
    mount = next(v for v in service["volumes"] if v.endswith("/etc/nats/region.conf:ro,z"))
    source = ROOT / mount.split(":")[0]
    assert source.resolve() == (ROOT / "infra" / "nats" / "region.conf").resolve()
    assert service["command"] == ["-c", "/etc/nats/region.conf"]
    config = "\n".join(line.split("#", 1)[0] for line in source.read_text().splitlines())
    needed = set(re.findall(r"\$([A-Z_]+)", config))
    env = env_of(f"nats-{region}")
    assert needed <= set(env), f"unset in compose: {needed - set(env)}"
    # The real nats-server parses the file with exactly this environment.
    run = subprocess.run([nats_server_bin(), "-c", str(source), "-t"], env={**env},
                         capture_output=True, text=True, timeout=20)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "healthcheck" in service and "8222" in " ".join(service["healthcheck"]["test"])
    assert env["NATS_HTTP_LISTEN"].endswith(":8222")


def test_gateway_urls_point_at_the_region_services() -> None:
    for region in REGIONS:
        env = env_of(f"nats-{region}")
        gw_port = int(env["NATS_GATEWAY_LISTEN"].rsplit(":", 1)[1])
        for other in REGIONS:
            host, port = host_port(env[f"GW_{other.upper().replace('-', '_')}"])
            assert host == f"nats-{other}" and port == gw_port


@pytest.mark.parametrize("region", REGIONS)
def test_node_settings_parse_and_prefer_their_own_region(region: str) -> None:
    env = env_of(f"prscd-{region}")
    settings = Settings.from_env(env)
    assert settings.extra == {}, f"keys the node does not know: {sorted(settings.extra)}"
    assert settings.mesh_id == region
    urls = settings.nats_url.split(",")
    assert next(host_port(u)[0] for u in urls) == f"nats-{region}"
    assert {host_port(u)[0] for u in urls} == {f"nats-{r}" for r in REGIONS}
    client_port = int(env_of(f"nats-{region}")["NATS_CLIENT_LISTEN"].rsplit(":", 1)[1])
    assert {host_port(u)[1] for u in urls} == {client_port}
    endpoint, note = resolve_endpoint(settings.jaeger_endpoint, settings.extra)
    assert host_port(endpoint) == ("jaeger", 4318) and note is None
    assert settings.cert_file.startswith("/certs/")
    deps = SERVICES[f"prscd-{region}"]["depends_on"]
    assert deps[f"nats-{region}"]["condition"] == "service_healthy"
    assert deps["certs"]["condition"] == "service_completed_successfully"


def test_published_ports_are_unique_and_tcp_udp_pairs() -> None:
    seen: set[int] = set()
    for region in REGIONS:
        ports = [parse_port(p) for p in SERVICES[f"prscd-{region}"]["ports"]]
        inside = int(env_of(f"prscd-{region}")["PORT"])
        host = {p.host_port for p in ports}
        assert len(host) == 1 and sorted(p.protocol for p in ports) == ["tcp", "udp"]
        assert all(p.container_port == inside for p in ports)
        assert not host & seen
        seen |= host
        public = urlsplit(env_of(f"prscd-{region}")["PUBLIC_URL"])
        assert public.port in host
    jaeger_ports = {parse_port(p).host_port for p in SERVICES["jaeger"]["ports"]}
    assert {16686, 4318} <= jaeger_ports


def test_every_port_is_published_on_loopback_only() -> None:
    """Open development mode (any key), Jaeger's intake: Docker's rules bypass host
    firewalls, so nothing is reachable from elsewhere unless someone opens it on purpose."""
    for name, service in SERVICES.items():
        for spec in service.get("ports", []):
            assert parse_port(spec).host_ip == "127.0.0.1", (name, spec)


def test_nats_client_ports_on_loopback_for_prscd_publish() -> None:
    """docs/mesh.md's `NATS_URL=nats://127.0.0.1:4222 prscd publish` works against compose."""
    for i, region in enumerate(REGIONS):
        [port] = [parse_port(p) for p in SERVICES[f"nats-{region}"]["ports"]]
        client = int(env_of(f"nats-{region}")["NATS_CLIENT_LISTEN"].rsplit(":", 1)[1])
        assert (port.host_port, port.container_port, port.protocol) == (4222 + i, client, "tcp")
    assert "nats://127.0.0.1:4222 prscd publish" in (ROOT / "docs" / "mesh.md").read_text()


def test_dotenv_reaches_the_nodes_when_present() -> None:
    for region in REGIONS:
        assert SERVICES[f"prscd-{region}"]["env_file"] == [{"path": ".env", "required": False}]


def test_nats_image_is_the_version_the_tests_validate_with() -> None:
    """region.conf is checked by nats-server-bin: a key only a newer server knows would
    pass here and break the cluster, unless both are one version."""
    run = subprocess.run([nats_server_bin(), "--version"], capture_output=True, text=True,
                         timeout=10)
    version = re.search(r"v(\d+\.\d+\.\d+)", run.stdout + run.stderr)
    assert version, run.stdout
    for region in REGIONS:
        assert SERVICES[f"nats-{region}"]["image"] == f"nats:{version.group(1)}-alpine"
    pins = (ROOT / "pyproject.toml").read_text()
    assert f'"nats-server-bin=={version.group(1)}"' in pins


def test_compose_file_is_valid_against_the_compose_spec_schema() -> None:
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(COMPOSE), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_loader_refuses_duplicate_keys_as_compose_does() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'ports'"):
        load_yaml("services:\n  a:\n    ports: []\n    ports: []\n")
    # Merge keys are not duplicates; a key after a merge overrides it, as in the file.
    doc = load_yaml("x: &x {a: 1, b: 2}\ny:\n  <<: *x\n  b: 3\n")
    assert doc["y"] == {"a": 1, "b": 3}


def test_drain_and_grace_period_agree_with_the_edge_docs() -> None:
    """infra/edge/README.md: DRAIN_SECONDS above the balancer's 30 s (40), the stop timeout
    above DRAIN_SECONDS + 5; the compose file uses exactly those numbers."""
    edge = (ROOT / "infra" / "edge" / "README.md").read_text()
    for region in REGIONS:
        drain = float(env_of(f"prscd-{region}")["DRAIN_SECONDS"])
        grace = SERVICES[f"prscd-{region}"]["stop_grace_period"]
        assert drain == 40 and grace == "50s" and float(grace[:-1]) > drain + 5
    assert "`DRAIN_SECONDS` above that (40)" in edge and "stop_grace_period: 50s" in edge
    assert "DRAIN_SECONDS=20" not in edge


def test_dependencies_are_their_own_layer_before_the_code() -> None:
    """A code change must not download every dependency again."""
    [build, _] = parse_dockerfile(DOCKERFILE)
    steps = [(s[0], s[1] if s[0] == "run" else s[1:3]) for s in build.steps]
    first_code = next(i for i, (kind, what) in enumerate(steps)
                      if kind == "copy" and "node" in what[0])
    deps = next(i for i, (kind, what) in enumerate(steps)
                if kind == "run" and "-r requirements.txt" in what)
    assert deps < first_code
    assert all(what[0] == ["pyproject.toml"] for kind, what in steps[:deps] if kind == "copy")


def test_every_dependency_exists() -> None:
    for name, service in SERVICES.items():
        for dep in service.get("depends_on", {}):
            assert dep in SERVICES, f"{name} depends on unknown {dep}"


def test_image_is_slim_non_root_and_health_checked() -> None:
    assert re.search(r"^FROM python:3\.11-slim", DOCKERFILE, re.M)
    assert re.search(r"^USER prscd$", DOCKERFILE, re.M)
    assert "HEALTHCHECK" in DOCKERFILE and "/health" in DOCKERFILE
    assert re.search(r"^EXPOSE 8443/tcp 8443/udp$", DOCKERFILE, re.M)
    for name in ("node", "mesh", "pyproject.toml"):
        assert re.search(rf"^COPY .*{name}", DOCKERFILE, re.M), name
    built = [n for n, s in SERVICES.items() if "build" in s]
    assert set(built) == {"certs", *(f"prscd-{r}" for r in REGIONS)}


def healthcheck_argv() -> list[str]:
    line = DOCKERFILE.split("HEALTHCHECK", 1)[1]
    cmd = line.split("CMD", 1)[1].strip()
    argv = json.loads(cmd.split("\n")[0])
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


async def test_image_healthcheck_command_passes_on_a_live_node(node_factory: NodeFactory) -> None:
    node = await node_factory()
    env = {**os.environ, "PORT": str(node.port)}
    proc = await asyncio.create_subprocess_exec(*healthcheck_argv(), env=env)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    await node.app.stop()
    proc = await asyncio.create_subprocess_exec(*healthcheck_argv(), env=env,
                                                stderr=asyncio.subprocess.DEVNULL)
    assert await asyncio.wait_for(proc.wait(), 10) != 0


def test_certs_service_makes_the_files_the_nodes_load() -> None:
    certs = SERVICES["certs"]
    code = certs["command"][0]
    assert "ensure_certificate" in code and "/certs" in code
    assert "prscd-certs:/certs" in certs["volumes"]
    for region in REGIONS:
        env = env_of(f"prscd-{region}")
        assert env["CERT_FILE"] == "/certs/dev-cert.pem" and env["KEY_FILE"] == "/certs/dev-key.pem"


class _AnyTagLoader(yaml.SafeLoader):
    """CloudFormation's !Ref and friends, read as plain values."""


_AnyTagLoader.add_multi_constructor(
    "!", lambda loader, suffix, node: loader.construct_scalar(node)
    if isinstance(node, yaml.ScalarNode) else None)


def test_edge_examples_health_check_ready_every_10s_3_times() -> None:
    edge = ROOT / "infra" / "edge"
    ga = yaml.load((edge / "aws-global-accelerator.yaml").read_text(), Loader=_AnyTagLoader)
    groups = [r["Properties"] for r in ga["Resources"].values()
              if r["Type"] == "AWS::GlobalAccelerator::EndpointGroup"]
    assert groups and all(g["HealthCheckPath"] == "/ready" and g["HealthCheckProtocol"] == "HTTPS"
                          and g["HealthCheckIntervalSeconds"] == 10 and g["ThresholdCount"] == 3
                          for g in groups)
    listeners = {r["Properties"]["Protocol"] for r in ga["Resources"].values()
                 if r["Type"] == "AWS::GlobalAccelerator::Listener"}
    assert listeners == {"TCP", "UDP"}  # WebSocket and WebTransport on one port
    r53 = json.loads((edge / "route53-geolocation.json").read_text())
    for check in r53["HealthChecks"]:
        cfg = check["HealthCheckConfig"]
        assert (cfg["ResourcePath"], cfg["RequestInterval"], cfg["FailureThreshold"]) == (
            "/ready", 10, 3)
    tm = json.loads((edge / "azure-traffic-manager.json").read_text())["properties"]["monitorConfig"]
    assert (tm["path"], tm["intervalInSeconds"], tm["toleratedNumberOfFailures"]) == ("/ready", 10, 3)
    # The drain must outlast the balancer's 30 s to notice; the docs say so.
    assert "DRAIN_SECONDS` above that (40)" in (edge / "README.md").read_text()


def test_build_context_has_what_the_dockerfile_copies_and_no_secrets() -> None:
    files = context_files(ROOT)
    assert ".env" not in files  # keys would end up in a layer
    assert not [f for f in files if f.startswith((".venv/", ".git/")) or "__pycache__" in f]
    for stage in parse_dockerfile(DOCKERFILE):
        for step in stage.steps:
            if step[0] == "copy" and step[3] is None:
                for src in step[1]:
                    assert any(f == src or f.startswith(src + "/") for f in files), src


def test_dockerignore_patterns_read_as_docker_reads_them() -> None:
    rules = [(True, ignore_regex("**/__pycache__")), (True, ignore_regex("docs/*.png")),
             (False, ignore_regex("docs/keep.png")), (True, ignore_regex(".env"))]
    assert ignored("node/__pycache__/x.pyc", rules) and ignored("__pycache__/a", rules)
    assert ignored("docs/a.png", rules) and not ignored("docs/keep.png", rules)
    assert not ignored("docs/sub/a.png", rules)  # * stops at a slash
    assert ignored(".env", rules) and not ignored(".env.example", rules)
