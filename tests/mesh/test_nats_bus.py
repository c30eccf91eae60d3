"""The NATS bus against real nats-server processes: names, states, outages, credentials, TLS."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from mesh.bridge import Source
from mesh.bus import BusMessage
from mesh.nats import BusUnavailable, NatsBus, backoff, redact, split_servers
from node.config import Settings
from node.protocol import Signalling
from node.tls import CertInfo
from tests.mesh.conftest import NatsFactory
from tests.mesh_helpers import NatsServer, free_port, wait_until


def settings(url: str, **env: str) -> Settings:
    return Settings.from_env({"NATS_URL": url, "NATS_RECONNECT_WAIT": "0.05",
                              "NATS_RECONNECT_MAX_WAIT": "0.3", **env})


async def roundtrip(bus: NatsBus, subject: str = "t.x") -> None:
    got: asyncio.Queue[BusMessage] = asyncio.Queue()

    async def handler(m: BusMessage) -> None:
        await got.put(m)

    sub = await bus.subscribe(subject, handler)
    await bus.publish(subject, b"hello", {"traceparent": "00-abc"})
    m = await asyncio.wait_for(got.get(), 5)
    assert m.data == b"hello" and m.headers == {"traceparent": "00-abc"}
    await sub.unsubscribe()


async def test_two_named_connections_and_states(nats_server: NatsServer) -> None:
    bus = NatsBus(settings(nats_server.url, YOMO_SNDR_NAME="src-east",
                           YOMO_RCVR_NAME="sfn-east"))
    states: list[str] = []
    bus.on_state(states.append)
    await bus.connect()
    try:
        assert bus.state == "connected" and bus.up
        await roundtrip(bus)
        names = {c.get("name") for c in nats_server.connz()["connections"]}
        assert {"src-east", "sfn-east"} <= names
        nats_server.kill()
        await wait_until(lambda: bus.state == "reconnecting", 5, "reconnecting")
        await bus.publish("t.y", b"buffered while reconnecting")  # must not raise
        nats_server.start()  # same ports; still owned (and stopped) by the fixture
        await wait_until(lambda: bus.state == "connected", 10, "reconnected")
        await roundtrip(bus, "t.z")
    finally:
        await bus.close()
    assert states[0] == "connecting" and states[-1] == "closed"
    assert "reconnecting" in states and states.count("connected") == 2


async def test_unreachable_at_start_serves_later(tmp_path: Path) -> None:
    port = free_port()
    bus = NatsBus(settings(f"nats://127.0.0.1:{port}"), connect_wait=0.3)
    await bus.connect()
    try:
        assert bus.state == "connecting" and not bus.up
        source = Source(bus, "m", "node-1", "src")
        await source.publish(Signalling(t="data", c="c", app="a", pl=b"\x80"))
        assert source.failed == 1  # counted, never raised into the peer path
        with pytest.raises(BusUnavailable):
            await bus.publish("x", b"")
        got: list[bytes] = []

        async def handler(m: BusMessage) -> None:
            got.append(m.data)

        await bus.subscribe("early.>", handler)  # before the first connect: kept
        server = NatsServer(tmp_path, "late", port=port).start()
        try:
            await wait_until(lambda: bus.up, 10, "connected")
            await bus.publish("early.x", b"1")
            await wait_until(lambda: got == [b"1"], 5, "message on the early subscription")
        finally:
            server.kill()
    finally:
        await bus.close()


async def test_failover_to_the_next_server_keeps_the_listed_order(
        nats_factory: NatsFactory) -> None:
    first, second = nats_factory("first"), nats_factory("second")
    bus = NatsBus(settings(f"{first.url},{second.url}"))
    await bus.connect()
    try:
        conns = bus.stats()["connections"]
        assert {c["server"] for c in conns.values()} == {redact(first.url)}
        first.kill()
        await wait_until(lambda: bus.up and all(
            c["server"] == redact(second.url) for c in bus.stats()["connections"].values()),
            5, "failover")
        await roundtrip(bus)
    finally:
        await bus.close()


async def test_user_password_and_token(nats_factory: NatsFactory,
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    userpass = nats_factory("userpass", args=["--user", "prscd", "--pass", "s3cret-pw"])
    token = nats_factory("token", args=["--auth", "t0ken-value"])
    good = NatsBus(settings(userpass.url, NATS_USER="prscd", NATS_PASSWORD="s3cret-pw"))
    tok = NatsBus(settings(token.url, NATS_TOKEN="t0ken-value"))
    bad = NatsBus(settings(userpass.url, NATS_USER="prscd", NATS_PASSWORD="wr0ng-pw"),
                  connect_wait=0.5)
    try:
        for bus in (good, tok, bad):
            await bus.connect()
        assert good.up and tok.up
        assert not bad.up and bad.state == "connecting"
        await roundtrip(good)
        await roundtrip(tok)
    finally:
        for bus in (good, tok, bad):
            await bus.close()
    text = caplog.text + repr(settings(userpass.url, NATS_PASSWORD="s3cret-pw",
                                       NATS_TOKEN="t0ken-value"))
    for secret in ("s3cret-pw", "t0ken-value", "wr0ng-pw"):
        assert secret not in text


async def test_tls_with_a_ca_file(nats_factory: NatsFactory, dev_cert: CertInfo) -> None:
    server = nats_factory("tls", args=["--tls", "--tlscert", str(dev_cert.cert_file),
                                       "--tlskey", str(dev_cert.key_file)])
    bus = NatsBus(settings(f"tls://127.0.0.1:{server.port}",
                           NATS_CA_FILE=str(dev_cert.cert_file)))
    await bus.connect()
    try:
        assert bus.up
        await roundtrip(bus)
    finally:
        await bus.close()


def test_helpers() -> None:
    assert split_servers("a:4222, nats://b:4222,,") == ["nats://a:4222", "nats://b:4222"]
    assert redact("nats://user:pw@host:4222") == "nats://host:4222"
    assert backoff(0, 0.25, 2) == 0
    assert 0.2 <= backoff(1, 0.25, 2) <= 0.3
    assert 1.6 <= backoff(10, 0.25, 2) <= 2.4
    assert "pw" not in repr(Settings.from_env({"NATS_URL": "nats://u:pw@h:1"}))
