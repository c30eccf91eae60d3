"""Tokens without sockets: the channel patterns, the verifier on made-up tokens (HS256,
ES256, RS256 keys made here), the answers Auth turns them into, and the join rule."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from node.auth import Auth, AuthError, AuthExpired, Grant
from node.config import ConfigError, Settings
from node.limits import MAX_CHANNEL_PATTERNS, OK, Guard, channel_allowed, parse_channels
from node.presence import Close, Peer, Presence
from node.protocol import Fault, Signalling
from node.tokens import (
    Claims,
    TokenExpired,
    TokenRefused,
    TokenVerifier,
    load_public_key,
    looks_like_jwt,
)

pytestmark = pytest.mark.unit

SECRET = "a-test-secret-of-at-least-32-bytes-S3CRET"


def pem(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def claims(sub: str = "alice", **extra: Any) -> dict[str, Any]:
    return {"sub": sub, "exp": int(time.time()) + 300, **extra}


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


async def refused(verifier: TokenVerifier, token: str, client_id: str = "alice") -> str:
    with pytest.raises(TokenRefused) as err:
        await verifier.verify(token, client_id)
    assert not isinstance(err.value, TokenExpired)
    return str(err.value)


# -- channel patterns -------------------------------------------------------------------


def test_channel_patterns_match_names_and_trailing_wildcards() -> None:
    allowed = parse_channels(["doc-42", "team-7/*"])
    assert channel_allowed(allowed, "doc-42")
    assert channel_allowed(allowed, "team-7/a") and channel_allowed(allowed, "team-7/a/b")
    assert not channel_allowed(allowed, "doc-4") and not channel_allowed(allowed, "doc-420")
    assert not channel_allowed(allowed, "team-7") and not channel_allowed(allowed, "team-70/a")
    assert channel_allowed(parse_channels(["*"]), "anything at all")
    assert channel_allowed(parse_channels(["room-*"]), "room-1")
    assert channel_allowed(None, "anything")  # no claim: any channel
    assert not channel_allowed(parse_channels([]), "doc-42")  # an empty list: none


@pytest.mark.parametrize("claim, why", [
    ("doc-42", "not a list"),
    ({"doc": 1}, "not a list"),
    ([1], "non-empty string"),
    ([""], "non-empty string"),
    ([None], "non-empty string"),
    (["a*b"], "'*' may only end"),
    (["*doc"], "'*' may only end"),
    (["**"], "'*' may only end"),
    (["x" * 129], "longer than 128 bytes"),
    (["c"] * (MAX_CHANNEL_PATTERNS + 1), f"more than {MAX_CHANNEL_PATTERNS}"),
])
def test_malformed_channel_lists_are_refused(claim: Any, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_channels(claim)


def test_the_join_rule_refuses_a_channel_outside_the_claims() -> None:
    presence = Presence("m")
    guard = Guard(Settings.from_env({}), presence)
    peer = Peer(sid="1", client_id="alice", app="app", transport="t",
                allowed_channels=("doc-42", "team-7/*"))
    presence.connect(peer)
    guard.opened(peer, 0.0)

    def join(name: str) -> Close | int:
        return guard.check(peer, Signalling(t="control", op="channel_join", c=name), 0.0)

    assert join("doc-42") == OK and join("team-7/x") == OK
    refusal = join("doc-43")
    assert isinstance(refusal, Close) and refusal.peer is peer
    assert refusal.fault is Fault.CHANNEL_FORBIDDEN and refusal.fault.code == 4003
    assert refusal.fault.counter == "channel_forbidden"
    assert refusal.reason == "channel not allowed by the token: doc-43"
    # Data for a channel not joined is the presence rules' business (dropped there).
    data = Signalling(t="data", c="doc-43", pl=b"\x80")
    assert guard.check(peer, data, 0.0) == OK


# -- what is a token --------------------------------------------------------------------


def test_only_jwts_are_taken_for_tokens() -> None:
    assert looks_like_jwt(hs256(claims()))
    none_alg = jwt.encode(claims(), None, algorithm="none")
    assert none_alg.endswith(".") and looks_like_jwt(none_alg)  # refused later, not a key
    for key in ("a-plain-key", "a.b.c", "x.y", "a.b.c.d", "eyJ9.e30.", "..",
                base64.urlsafe_b64encode(b"[1]").decode().rstrip("=") + ".e30.x",
                "eyJhbGciOiJIUzI1NiJ9.e30.sig=", "eyJhbGciOiJIUzI1NiJ9..sig"):
        assert not looks_like_jwt(key), key


# -- the verifier -----------------------------------------------------------------------


async def test_hs256_binds_the_id_and_carries_app_and_channels() -> None:
    v = TokenVerifier(secret=SECRET)
    token = hs256(claims(app="acme", channels=["doc-42", "team-7/*"]))
    assert await v.verify(token, "alice") == Claims("acme", ("doc-42", "team-7/*"))
    assert await v.verify(hs256(claims()), "alice") == Claims(None, None)
    assert await refused(v, token, "mallory") == "token sub does not match id"
    assert await refused(v, hs256(claims(), "another-secret-of-at-least-32-bytes!")) == (
        "bad token signature")
    assert await refused(v, hs256({"sub": "alice"})) == "token has no exp"
    assert await refused(v, hs256({"exp": int(time.time()) + 60})) == "token has no sub"
    assert await refused(v, hs256(claims(sub=7))) == "malformed token"  # type: ignore[arg-type]
    assert await refused(v, "bm90IGpzb24.e30.c2ln") == "malformed token"  # header not JSON
    signed_junk = jwt.api_jws.encode(b"not json", SECRET, algorithm="HS256")
    assert await refused(v, signed_junk) == "malformed token"  # signed, but no claims


async def test_expiry_and_not_before_with_the_leeway() -> None:
    v = TokenVerifier(secret=SECRET, leeway=30)
    now = int(time.time())
    assert await v.verify(hs256({"sub": "alice", "exp": now - 10}), "alice")  # within leeway
    with pytest.raises(TokenExpired, match=r"^token expired$"):
        await v.verify(hs256({"sub": "alice", "exp": now - 60}), "alice")
    assert await v.verify(hs256(claims(nbf=now + 10, iat=now + 10)), "alice")
    assert await refused(v, hs256(claims(nbf=now + 120))) == "token not yet valid"
    assert await refused(v, hs256(claims(iat=now + 120))) == "token not yet valid"
    strict = TokenVerifier(secret=SECRET, leeway=0)
    with pytest.raises(TokenExpired):
        await strict.verify(hs256({"sub": "alice", "exp": now - 10}), "alice")


async def test_es256_and_rs256_public_keys(ec_key: Any, rsa_key: Any, tmp_path: Path) -> None:
    for name, private, alg in (("ec.pem", ec_key, "ES256"), ("rsa.pem", rsa_key, "RS256")):
        path = tmp_path / name
        path.write_bytes(pem(private.public_key()))
        key, found = load_public_key(str(path))
        assert found == alg
        v = TokenVerifier(public_key=key, public_alg=alg)
        token = jwt.encode(claims(app="a"), private, algorithm=alg)
        assert await v.verify(token, "alice") == Claims("a", None)
        assert await refused(v, token, "bob") == "token sub does not match id"
        # The other asymmetric algorithm, and HS256, are not this key's.
        other = "RS256" if alg == "ES256" else "ES256"
        other_key = rsa_key if alg == "ES256" else ec_key
        assert await refused(v, jwt.encode(claims(), other_key, algorithm=other)) == (
            "token algorithm not accepted")
        assert await refused(v, hs256(claims())) == "token algorithm not accepted"


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token written by hand (what an attacker sends), signed with whatever they like."""
    def enc(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).decode().rstrip("=")

    head = enc(json.dumps(header).encode()) + "." + enc(json.dumps(payload).encode())
    return head + "." + enc(signature)


async def test_alg_none_and_hs256_signed_with_the_public_key_are_refused(
        rsa_key: Any, tmp_path: Path) -> None:
    import hashlib
    import hmac

    public_pem = pem(rsa_key.public_key())
    path = tmp_path / "rsa.pem"
    path.write_bytes(public_pem)
    key, alg = load_public_key(str(path))
    only_pem = TokenVerifier(public_key=key, public_alg=alg)
    both = TokenVerifier(secret=SECRET, public_key=key, public_alg=alg)
    unsigned = jwt.encode(claims(), None, algorithm="none")
    for v in (only_pem, both, TokenVerifier(secret=SECRET)):
        assert await refused(v, unsigned) == "token algorithm not accepted"
    for alg_name in ("None", "NONE", "HS512", "PS256", ""):
        assert await refused(both, forge({"alg": alg_name}, claims())) == (
            "token algorithm not accepted")
    # The classic confusion: HMAC with the (public) PEM as the secret.
    head = forge({"alg": "HS256", "typ": "JWT"}, claims()).rsplit(".", 1)[0]
    mac = hmac.new(public_pem, head.encode(), hashlib.sha256).digest()
    confused = head + "." + base64.urlsafe_b64encode(mac).decode().rstrip("=")
    assert await refused(only_pem, confused) == "token algorithm not accepted"
    assert await refused(both, confused) == "bad token signature"


@pytest.mark.parametrize("extra, why", [
    ({"channels": "doc-42"}, "malformed channels claim: channels is not a list"),
    ({"channels": ["a*b"]}, "malformed channels claim: '*' may only end a channel pattern"),
    ({"channels": None}, "malformed channels claim: channels is not a list"),
    ({"app": ""}, "malformed app claim"),
    ({"app": 3}, "malformed app claim"),
    ({"app": "a\nb"}, "malformed app claim"),
    ({"app": "x" * 129}, "malformed app claim"),
    ({"aud": "someone-else"}, "token has an aud claim: not accepted here"),
])
async def test_malformed_claims(extra: dict[str, Any], why: str) -> None:
    assert await refused(TokenVerifier(secret=SECRET), hs256(claims(**extra))) == why


# -- settings and the answers Auth makes of it --------------------------------------------


def test_settings_turn_tokens_on_and_the_open_mode_off(tmp_path: Path) -> None:
    assert Auth.from_settings(Settings.from_env({})).tokens is None
    auth = Auth.from_settings(Settings.from_env({"AUTH_TOKEN_SECRET": SECRET}))
    assert auth.tokens is not None and not auth.open_mode
    with pytest.raises(ConfigError) as err:
        Auth.from_settings(Settings.from_env({"AUTH_TOKEN_SECRET": "short-S3CRET"}))
    assert "at least 32 bytes" in str(err.value) and "S3CRET" not in str(err.value)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    for path, why in ((bad, "not a PEM public key"), (tmp_path / "missing.pem", "No such")):
        with pytest.raises(ConfigError, match=why):
            Auth.from_settings(Settings.from_env({"AUTH_TOKEN_PUBLIC_KEY_FILE": str(path)}))
    small = tmp_path / "small.pem"
    small.write_bytes(pem(rsa.generate_private_key(65537, 1024).public_key()))
    with pytest.raises(ConfigError, match="RSA >= 2048"):
        load_public_key(str(small))


async def test_auth_answers_401_403_and_keeps_other_keys(
        caplog: pytest.LogCaptureFixture) -> None:
    tokens_only = Auth.from_settings(Settings.from_env({"AUTH_TOKEN_SECRET": SECRET,
                                                        "DEFAULT_APP": "main"}))
    good = hs256(claims(channels=["doc-*"]))
    assert await tokens_only.grant(good, "alice") == Grant("main", ("doc-*",))
    assert await tokens_only.grant(hs256(claims(app="acme")), "alice") == Grant("acme")
    with pytest.raises(AuthError) as err:  # not a token, nothing else configured: 403
        await tokens_only.grant("a-plain-key", "alice")
    assert err.value.status == 403 and err.value.answer == "publickey rejected"
    expired = hs256({"sub": "alice", "exp": int(time.time()) - 3600})
    with pytest.raises(AuthExpired) as expired_err:
        await tokens_only.grant(expired, "alice")
    assert expired_err.value.status == 401 and expired_err.value.answer == "token expired"
    with pytest.raises(AuthError) as sub_err:
        await tokens_only.grant(good, "bob")
    assert sub_err.value.status == 403
    assert sub_err.value.answer == "token sub does not match id"
    # The log's reason names the token by a fingerprint, never by itself.
    assert "fingerprint" in str(sub_err.value) and good not in str(sub_err.value)
    mixed = Auth.from_settings(Settings.from_env({"AUTH_TOKEN_SECRET": SECRET,
                                                  "PUBLIC_KEYS": "old-key:legacy"}))
    assert await mixed.grant("old-key", "anyone") == Grant("legacy")  # the old way
    # A JWT-looking key is a key when token auth is off.
    assert await Auth.from_keys({}).grant(good, "anyone") == Grant("default")
