"""Certificates: load CERT_FILE/KEY_FILE, or make a dev certificate when none is given.

The dev certificate is ECDSA P-256 and valid for 14 days because that is what
browsers accept for WebTransport ``serverCertificateHashes``; it is cached and
regenerated when it has less than two days left, so nobody ships an expiring
shared certificate again.

A running node follows its files (:class:`CertificateWatcher`): a pair renewed on disk
(docker-compose's ``certs`` service, certbot, the node's own dev-certificate renewal)
reaches new connections within ``CHECK_INTERVAL`` without a restart.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import ipaddress
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEV_VALIDITY = dt.timedelta(days=14)
RENEW_BEFORE = dt.timedelta(days=2)
DEV_NAMES = ("localhost", "127.0.0.1", "::1")
#: Seconds between looks at the certificate files (two stat calls each).
CHECK_INTERVAL = 5.0

log = logging.getLogger("prscd.tls")


@dataclass(frozen=True, slots=True)
class CertInfo:
    cert_file: Path
    key_file: Path
    #: base64 sha-256 of the SubjectPublicKeyInfo, for --ignore-certificate-errors-spki-list.
    spki_sha256_b64: str
    #: hex sha-256 of the certificate DER, for WebTransport serverCertificateHashes.
    cert_sha256_hex: str
    not_after: dt.datetime
    generated: bool


def _describe(cert_file: Path, key_file: Path, generated: bool) -> CertInfo:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return CertInfo(
        cert_file=cert_file,
        key_file=key_file,
        spki_sha256_b64=base64.b64encode(hashlib.sha256(spki).digest()).decode(),
        cert_sha256_hex=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        not_after=cert.not_valid_after_utc,
        generated=generated,
    )


def _names(domain: str) -> tuple[str, ...]:
    return (*DEV_NAMES, domain) if domain and domain not in DEV_NAMES else DEV_NAMES


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _still_good(cert_file: Path, names: tuple[str, ...], now: dt.datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    return cert.not_valid_after_utc - now > RENEW_BEFORE and san == _san(names)


def make_dev_certificate(cert_file: Path, key_file: Path, names: tuple[str, ...],
                         now: dt.datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prscd dev certificate")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now - dt.timedelta(minutes=5) + DEV_VALIDITY)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    tmp_key = key_file.with_suffix(".tmp")
    tmp_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(tmp_key, 0o600)
    tmp_cert = cert_file.with_suffix(".tmp")
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # Rename last so a concurrent node never reads half a pair.
    os.replace(tmp_key, key_file)
    os.replace(tmp_cert, cert_file)


def ensure_certificate(cert_file: str, key_file: str, cache_dir: Path, domain: str = "",
                       now: dt.datetime | None = None) -> CertInfo:
    """The configured pair, or the cached dev pair (made or renewed as needed)."""
    if cert_file:
        return _describe(Path(cert_file), Path(key_file), generated=False)
    now = now or dt.datetime.now(dt.UTC)
    names = _names(domain)
    cert_path, key_path = cache_dir / "dev-cert.pem", cache_dir / "dev-key.pem"
    generated = False
    if _still_good(cert_path, names, now) and key_path.exists():
        return _describe(cert_path, key_path, generated)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Several processes may renew at once (--workers N: each node's watcher sees the same
    # expiry): one makes the pair, the others find it good under the lock.
    with open(cache_dir / ".dev-cert.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (_still_good(cert_path, names, now) and key_path.exists()):
            make_dev_certificate(cert_path, key_path, names, now)
            generated = True
        return _describe(cert_path, key_path, generated)


def server_context(info: CertInfo) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(info.cert_file, info.key_file)
    return ctx


# -- a renewed pair reaches a running node ---------------------------------------------


def _stamp(info: CertInfo) -> tuple[tuple[int, int, int], ...]:
    """What changes when either file is rewritten or replaced (a rename changes the inode)."""
    stamps = []
    for path in (info.cert_file, info.key_file):
        try:
            st = path.stat()
        except OSError:
            stamps.append((0, 0, 0))
        else:
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stamps)


class CertificateWatcher:
    """Follows the certificate files: when they change, checks that the new pair loads and
    matches, then hands it to every ``on_change`` (the TLS context for new TCP connections,
    the QUIC configuration for new WebTransport connections, /cert-hash). Connections that
    are open keep the certificate they were made with. A generated dev certificate is also
    renewed here when under two days remain, as a restart would.
    """

    def __init__(self, info: CertInfo, on_change: list[Callable[[CertInfo], None]], *,
                 cache_dir: Path | None = None, domain: str = "",
                 interval: float | None = None) -> None:
        self.info = info
        self.on_change = on_change
        self.cache_dir, self.domain = cache_dir, domain
        self.interval = CHECK_INTERVAL if interval is None else interval
        self.reloads = 0
        self._stamp = _stamp(info)
        self._failed: tuple[tuple[int, int, int], ...] | None = None
        self._task: asyncio.Task[None] | None = None

    def check(self, now: dt.datetime | None = None) -> bool:
        """One look; True when a new pair was taken into use."""
        if self.info.generated and self.cache_dir is not None:
            now = now or dt.datetime.now(dt.UTC)
            if self.info.not_after - now <= RENEW_BEFORE:
                ensure_certificate("", "", self.cache_dir, self.domain, now)
        stamp = _stamp(self.info)
        if stamp == self._stamp or stamp == self._failed:
            return False
        try:
            # A scratch context first: a half-written pair (key renamed, certificate not
            # yet) fails here and never reaches the live context.
            server_context(self.info)
            fresh = _describe(self.info.cert_file, self.info.key_file, self.info.generated)
        except (OSError, ValueError, ssl.SSLError) as exc:
            if self._failed is None:
                log.warning("certificate files changed but do not load (%s); still serving "
                            "spki_sha256=%s, trying again when they change",
                            exc, self.info.spki_sha256_b64)
            self._failed = stamp
            return False
        for apply in self.on_change:
            apply(fresh)
        self.info, self._stamp, self._failed = fresh, stamp, None
        self.reloads += 1
        log.info("certificate reloaded file=%s not_after=%s spki_sha256=%s cert_sha256=%s "
                 "(new connections use it; GET /cert-hash serves it)", fresh.cert_file,
                 fresh.not_after.isoformat(), fresh.spki_sha256_b64, fresh.cert_sha256_hex)
        return True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cert-watcher")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:  # a bad look must not end the watching
                log.exception("certificate check failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


# -- what a developer copies to open the demo pages ------------------------------------


def public_origin(public_url: str, domain: str, host: str, port: int) -> str:
    """host:port a browser reaches this node at: PUBLIC_URL's when set (behind a published
    or forwarded port the listening port is not the one users see), else DOMAIN or HOST."""
    if public_url:
        parts = urlsplit(public_url)
        if parts.hostname:
            name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            default = 80 if parts.scheme in ("http", "ws") else 443
            return f"{name}:{parts.port or default}"
    name = domain or (host if host not in ("", "0.0.0.0", "::") else "127.0.0.1")
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def chromium_command(info: CertInfo, origin: str) -> str:
    """A shell command that opens the demo over native WebTransport with this certificate.

    Chromium ignores ``--ignore-certificate-errors-spki-list`` without ``--user-data-dir``,
    and ignores every flag when it is already running with that profile (the command is
    handed to the running instance): hence a fresh profile directory each time.
    """
    return (f'chromium --user-data-dir="$(mktemp -d)" '
            f"--ignore-certificate-errors-spki-list={info.spki_sha256_b64} "
            f"--origin-to-force-quic-on={origin} https://{origin}/")
