"""A renewed certificate reaches a running node without a restart (node/tls.py's watcher):
new TLS connections (WebSocket), new QUIC connections (WebTransport) and /cert-hash all
take the new pair; open connections keep theirs; a half-written pair is never served."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from websockets.asyncio.client import connect

from node.app import App
from node.config import Settings
from node.tls import DEV_NAMES, ensure_certificate, make_dev_certificate
from tests.conftest import RunningNode
from tests.helpers import get, insecure
from tests.mesh_helpers import wait_until
from tests.wt_client import wt_connect


async def served_by_tls(port: int) -> str:
    """sha-256 (hex) of the certificate a new TCP TLS connection gets."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=insecure(),
                                              server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256()).hex()


async def served_by_quic(port: int) -> str:
    async with wt_connect(port) as client:
        cert = client._quic.tls._peer_certificate  # aioquic keeps what the server sent
        assert cert is not None
        return cert.fingerprint(hashes.SHA256()).hex()


async def cert_hash(port: int) -> dict[str, str]:
    status, _, body = await get(f"https://127.0.0.1:{port}/cert-hash")
    assert status == 200
    return json.loads(body)


Starter = Callable[[], Awaitable[RunningNode]]


def file_hash(path: Path) -> str:
    return x509.load_pem_x509_certificate(path.read_bytes()).fingerprint(hashes.SHA256()).hex()


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "certs" / "cert.pem", tmp_path / "certs" / "key.pem"
    make_dev_certificate(cert, key, DEV_NAMES, dt.datetime.now(dt.UTC))
    return cert, key


@pytest.fixture
async def start(pair: tuple[Path, Path], tmp_path: Path) -> AsyncIterator[Starter]:
    """A node loading CERT_FILE/KEY_FILE as node/cli.py does (docker compose's nodes)."""
    apps: list[App] = []

    async def run() -> RunningNode:
        cert, key = pair
        settings = Settings.from_env({"PORT": "0", "HOST": "127.0.0.1", "CERT_FILE": str(cert),
                                      "KEY_FILE": str(key), "PID_FILE": str(tmp_path / "pid")})
        app = App(settings, ensure_certificate(settings.cert_file, settings.key_file,
                                               settings.cert_cache_dir))
        await app.start()
        apps.append(app)
        return RunningNode(app)

    yield run
    for app in apps:
        await app.stop()


async def test_a_renewed_pair_reaches_new_connections_and_cert_hash(
        start: Starter, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("node.tls.CHECK_INTERVAL", 0.05)
    cert, key = pair
    node = await start()
    old = file_hash(cert)
    assert await served_by_tls(node.port) == old
    assert await served_by_quic(node.port) == old
    assert (await cert_hash(node.port))["value"] == old
    async with connect(node.ws_url(client_id="early"), ssl=insecure()) as early:
        # What docker compose's `certs` service (or certbot) does: a new pair, renamed in.
        make_dev_certificate(cert, key, DEV_NAMES, dt.datetime.now(dt.UTC))
        new = file_hash(cert)
        assert new != old
        await wait_until(lambda: node.app.certificates is not None
                         and node.app.certificates.info.cert_sha256_hex == new, timeout=5)
        assert (await cert_hash(node.port))["value"] == new
        assert await served_by_tls(node.port) == new
        assert await served_by_quic(node.port) == new
        await early.ping()  # the open connection is not cut by the reload
    assert node.app.certificates is not None and node.app.certificates.reloads == 1


async def test_a_half_written_pair_is_not_taken(
        start: Starter, pair: tuple[Path, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    cert, key = pair
    node = await start()
    watcher = node.app.certificates
    assert watcher is not None
    old = watcher.info.cert_sha256_hex
    # A new key renamed in, its certificate not yet: the pair does not match.
    other_cert, other_key = tmp_path / "other-cert.pem", tmp_path / "other-key.pem"
    make_dev_certificate(other_cert, other_key, DEV_NAMES, dt.datetime.now(dt.UTC))
    key.write_bytes(other_key.read_bytes())
    assert watcher.check() is False
    assert "do not load" in caplog.text
    assert await served_by_tls(node.port) == old and (await cert_hash(node.port))["value"] == old
    # The certificate follows: now it is taken.
    cert.write_bytes(other_cert.read_bytes())
    assert watcher.check() is True
    assert await served_by_tls(node.port) == file_hash(other_cert)


def test_a_generated_dev_certificate_is_renewed_by_the_running_node(tmp_path: Path) -> None:
    from node.tls import CertificateWatcher, ensure_certificate

    info = ensure_certificate("", "", tmp_path)
    taken: list[str] = []
    watcher = CertificateWatcher(info, [lambda i: taken.append(i.cert_sha256_hex)],
                                 cache_dir=tmp_path)
    assert watcher.check() is False  # nothing changed, nothing due
    assert watcher.check(now=info.not_after - dt.timedelta(days=1)) is True
    assert taken == [watcher.info.cert_sha256_hex] and taken[0] != info.cert_sha256_hex
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(watcher.info.cert_file, watcher.info.key_file)  # a matching pair


def test_processes_renewing_at_once_leave_one_matching_pair(tmp_path: Path) -> None:
    """--workers N: every worker's watcher sees the same expiry at the same time."""
    from node.tls import ensure_certificate

    info = ensure_certificate("", "", tmp_path)
    later = (info.not_after - dt.timedelta(days=1)).isoformat()
    code = ("import datetime as dt, sys; from pathlib import Path; "
            "from node.tls import ensure_certificate; "
            f"ensure_certificate('', '', Path(sys.argv[1]), now=dt.datetime.fromisoformat({later!r}))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)]) for _ in range(4)]
    assert [p.wait(30) for p in procs] == [0] * 4
    renewed = ensure_certificate("", "", tmp_path)
    assert renewed.cert_sha256_hex != info.cert_sha256_hex
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(renewed.cert_file, renewed.key_file)
