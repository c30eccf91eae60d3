"""Certificates: load CERT_FILE/KEY_FILE, or make a dev certificate when none is given.

The dev certificate is ECDSA P-256 and valid for 14 days because that is what
browsers accept for WebTransport ``serverCertificateHashes``; it is cached and
regenerated when it has less than two days left, so nobody ships an expiring
shared certificate again.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEV_VALIDITY = dt.timedelta(days=14)
RENEW_BEFORE = dt.timedelta(days=2)
DEV_NAMES = ("localhost", "127.0.0.1", "::1")


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
    if not (_still_good(cert_path, names, now) and key_path.exists()):
        make_dev_certificate(cert_path, key_path, names, now)
        generated = True
    return _describe(cert_path, key_path, generated)


def server_context(info: CertInfo) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(info.cert_file, info.key_file)
    return ctx
