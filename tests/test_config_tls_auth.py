"""Settings parsing, the dev certificate and key-to-app mapping."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from node.auth import Auth, AuthError, fingerprint
from node.config import ConfigError, Settings
from node.tls import ensure_certificate

pytestmark = pytest.mark.unit


def test_defaults() -> None:
    s = Settings.from_env({})
    assert (s.port, s.mesh_id, s.tls, s.nats_url, s.max_message_bytes) == (
        8443, "local", True, "", 65536)
    assert not s.keys_configured and not s.ws_compression


@pytest.mark.parametrize(("env", "message"), [
    ({"PORT": "x"}, "PORT='x'"),
    ({"PORT": "70000"}, "not a port"),
    ({"DEBUG": "maybe"}, "DEBUG='maybe'"),
    ({"MESH_ID": "eu west"}, "MESH_ID"),
    ({"CERT_FILE": "a.pem"}, "together"),
    ({"PUBLIC_KEYS": "nocolon"}, "not KEY:APP"),
    ({"PING_INTERVAL": "-1"}, "negative"),
])
def test_bad_values_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        Settings.from_env(env)
    assert message in str(err.value)


def test_keys_from_env_and_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfile-key: app-b\n")
    s = Settings.from_env({"PUBLIC_KEYS": "env-key:app-a", "PUBLIC_KEYS_FILE": str(keys)})
    assert s.public_keys == {"env-key": "app-a", "file-key": "app-b"}
    assert "env-key" not in repr(s)


def test_bad_keys_file_does_not_echo_the_secret(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("super-secret-without-app\n")
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"PUBLIC_KEYS_FILE": str(keys)})
    assert "super-secret" not in str(err.value)


def test_auth_open_mode_and_listed_keys() -> None:
    assert Auth.from_keys({}).app_for("anything") == "default"
    auth = Auth.from_keys({"k": "app"})
    assert auth.app_for("k") == "app"
    with pytest.raises(AuthError) as err:
        auth.app_for("nope")
    assert "nope" not in str(err.value) and fingerprint("nope") in str(err.value)


def test_dev_certificate_suits_webtransport_and_is_reused(tmp_path: Path) -> None:
    info = ensure_certificate("", "", tmp_path)
    cert = x509.load_pem_x509_certificate(info.cert_file.read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=14)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    assert info.generated and (info.key_file.stat().st_mode & 0o777) == 0o600
    again = ensure_certificate("", "", tmp_path)
    assert not again.generated and again.cert_sha256_hex == info.cert_sha256_hex


def test_dev_certificate_is_renewed_near_expiry(tmp_path: Path) -> None:
    first = ensure_certificate("", "", tmp_path)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=13)
    renewed = ensure_certificate("", "", tmp_path, now=later)
    assert renewed.generated and renewed.cert_sha256_hex != first.cert_sha256_hex


def test_domain_is_added_to_dev_certificate(tmp_path: Path) -> None:
    info = ensure_certificate("", "", tmp_path, domain="presence.example")
    cert = x509.load_pem_x509_certificate(info.cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "presence.example" in san.get_values_for_type(x509.DNSName)


def test_given_certificate_is_used_as_is(tmp_path: Path) -> None:
    made = ensure_certificate("", "", tmp_path / "a")
    given = ensure_certificate(str(made.cert_file), str(made.key_file), tmp_path / "b")
    assert not given.generated and given.cert_sha256_hex == made.cert_sha256_hex
    assert not (tmp_path / "b").exists()
