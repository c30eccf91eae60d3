"""Tokens on a running node, over real sockets: admission on WebSocket and WebTransport
(101 / 401 / 403), a join outside the token's channels closed 4003 with nobody else
hearing of it, a JWKS on a local HTTP server (rotation, a flood of unknown kids, the
issuer down), and no token or secret in the logs of a real prscd process."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import NodeFactory, RunningNode
from tests.helpers import barrier, data_frame, insecure, join_frame, joined, recv
from tests.mesh_helpers import free_port, wait_until
from tests.test_cli import run_prscd
from tests.test_limits import close_of, offline_seen
from tests.wt_client import wt_connect

SECRET = "tokens-test-secret-32-bytes-or-more-S3CRET"


def hs256(sub: str, *, exp_in: float = 300, secret: str = SECRET, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + exp_in), **claims}, secret,
                      algorithm="HS256")


async def answer(node: RunningNode, key: str, client_id: str) -> tuple[int, str]:
    """The HTTP status of a WebSocket handshake and the reason in the body (101: '')."""
    try:
        ws = await connect(node.ws_url(key, client_id), ssl=insecure())
    except InvalidStatus as exc:
        return exc.response.status_code, exc.response.body.decode().strip()
    await ws.close()
    return 101, ""


async def wt_answer(node: RunningNode, key: str, client_id: str) -> tuple[int, str]:
    async with wt_connect(node.port, f"/v1?publickey={key}&id={client_id}") as wt:
        assert wt.status is not None
        if wt.status != 200:
            await wt.until(lambda: wt.session_fin, 5, "the refusal's body")
        return wt.status, wt.body.decode().strip()


async def test_token_admission_on_both_transports(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "issuer.pem"
    pem.write_bytes(rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    node = await node_factory(AUTH_TOKEN_SECRET=SECRET, AUTH_TOKEN_PUBLIC_KEY_FILE=str(pem),
                              DEFAULT_APP="main")
    rs256 = jwt.encode({"sub": "rita", "exp": int(time.time()) + 60}, rsa_key,
                       algorithm="RS256")
    cases = [
        (hs256("alice"), "alice", 101, ""),
        (rs256, "rita", 101, ""),
        (hs256("alice"), "mallory", 403, "token sub does not match id"),
        (hs256("alice", exp_in=-3600), "alice", 401, "token expired"),
        (hs256("alice", secret="not-the-secret-but-32-bytes-long!!"), "alice", 403,
         "bad token signature"),
        (jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none"),
         "alice", 403, "token algorithm not accepted"),
        (hs256("alice", channels="doc-42"), "alice", 403,
         "malformed channels claim: channels is not a list"),
        ("a-plain-publickey", "alice", 403, "publickey rejected"),  # no default app
    ]
    for key, client_id, status, reason in cases:
        assert await answer(node, key, client_id) == (status, reason), (client_id, reason)
        wt_status = 200 if status == 101 else status
        assert await wt_answer(node, key, client_id) == (wt_status, reason), (client_id, reason)
    # The app claim picks the realm: same channel name, other app, nothing crosses.
    a1 = await joined(node, "room", "a1", key=hs256("a1", app="acme"))
    a2 = await joined(node, "room", "a2", key=hs256("a2", app="acme"))
    m1 = await joined(node, "room", "m1", key=hs256("m1"))
    assert set(node.node.presence.realms) == {"acme", "main"}
    await m1.send(data_frame("room", "m", '"main only"'))
    await barrier(a2, a1, "room")  # a1's next frame is a2's marker: nothing from m1
    for ws in (a1, a2, m1):
        await ws.close()


async def test_a_join_outside_the_channels_closes_4003_and_nobody_hears_of_it(
        node_factory: NodeFactory) -> None:
    node = await node_factory(AUTH_TOKEN_SECRET=SECRET)
    bob = await joined(node, "doc-42", "bob", key=hs256("bob"))
    carol = await joined(node, "secret", "carol", key=hs256("carol"))
    dave = await joined(node, "secret", "dave", key=hs256("dave"))
    alice_key = hs256("alice", channels=["doc-42", "team-7/*"])
    alice = await joined(node, "doc-42", "alice", key=alice_key)
    await alice.send(join_frame("team-7/design", "alice"))
    assert (await recv(alice))["c"] == "team-7/design"
    await alice.send(join_frame("secret", "alice"))
    assert await close_of(alice) == (4003, "channel not allowed by the token: secret")
    await offline_seen(bob, "alice")  # alice's other channels see her go
    await barrier(dave, carol, "secret")  # the refused join never reached "secret"
    await barrier(carol, dave, "secret")
    assert node.node.presence.dropped["channel_forbidden"] == 1
    # The same over WebTransport: the close capsule carries the code and the reason.
    async with wt_connect(node.port, f"/v1?publickey={alice_key}&id=alice") as wt:
        assert wt.status == 200
        wt.send_datagram(join_frame("team-7/x", "alice"))
        await wt.next_message(match=lambda m: m.get("op") == "channel_join")
        wt.send_datagram(join_frame("secret", "alice"))
        await wt.until(lambda: wt.close_capsule is not None, 5, "the close capsule")
        assert wt.close_capsule == (4003, "channel not allowed by the token: secret")
    await barrier(dave, carol, "secret")
    assert node.node.presence.dropped["channel_forbidden"] == 2
    for ws in (bob, carol, dave):
        await ws.close()


# -- JWKS -------------------------------------------------------------------------------


class Issuer:
    """A JWKS endpoint on aiohttp.web: ``keys`` is what it serves; ``gate`` (when set)
    holds every answer until released; ``requests`` counts the fetches."""

    def __init__(self) -> None:
        self.private: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.keys: list[dict[str, Any]] = []
        self.requests = 0
        self.gate: asyncio.Event | None = None
        self.runner: web.AppRunner | None = None
        self.port = 0

    def add(self, kid: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        self.private[kid] = key
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        self.keys.append({**jwk, "kid": kid, "use": "sig", "alg": "ES256"})

    def token(self, kid: str, sub: str = "alice") -> str:
        key = self.private.get(kid) or ec.generate_private_key(ec.SECP256R1())
        return jwt.encode({"sub": sub, "exp": int(time.time()) + 300}, key,
                          algorithm="ES256", headers={"kid": kid})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks"

    async def _serve(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.gate is not None:
            await self.gate.wait()
        return web.json_response({"keys": self.keys})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks", self._serve)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    it = Issuer()
    await it.start()
    yield it
    await it.stop()


async def test_jwks_rotation_floods_and_outages(
        node_factory: NodeFactory, issuer: Issuer) -> None:
    issuer.add("k1")
    node = await node_factory(AUTH_JWKS_URL=issuer.url)
    jwks = node.node.auth.tokens.jwks  # type: ignore[union-attr]
    now = [1000.0]
    jwks.clock = lambda: now[0]  # the refresh interval, without waiting for it
    assert await answer(node, issuer.token("k1"), "alice") == (101, "")
    assert await answer(node, issuer.token("k1"), "alice") == (101, "")
    assert issuer.requests == 1  # fetched once, on first use, then cached
    assert await answer(node, issuer.token("k1"), "bob") == (
        403, "token sub does not match id")
    # Rotation: the issuer adds k2. Within the interval the node does not ask again...
    issuer.add("k2")
    assert await answer(node, issuer.token("k2"), "alice") == (403, "unknown token kid")
    assert issuer.requests == 1
    # ...after it, one refresh and the new key is in.
    now[0] += jwks.min_interval
    assert await answer(node, issuer.token("k2"), "alice") == (101, "")
    assert await answer(node, issuer.token("k1"), "alice") == (101, "")
    assert issuer.requests == 2
    # A flood of made-up kids, all at once: one fetch, in flight for all of them.
    now[0] += jwks.min_interval
    issuer.gate = asyncio.Event()
    flood = [asyncio.ensure_future(answer(node, issuer.token(f"bogus-{i}"), "alice"))
             for i in range(20)]
    await wait_until(lambda: issuer.requests == 3, 5, "the flood's one fetch")
    good = await answer(node, issuer.token("k1"), "alice")  # known kids do not wait
    assert good == (101, "") and not any(f.done() for f in flood)
    issuer.gate.set()
    assert await asyncio.gather(*flood) == [(403, "unknown token kid")] * 20
    assert [await answer(node, issuer.token(f"again-{i}"), "alice") for i in range(5)] == [
        (403, "unknown token kid")] * 5
    assert issuer.requests == 3 and jwks.fetches == 3
    # The issuer goes away: unknown kids cannot be checked (503, fail closed), known
    # keys keep working.
    issuer.gate = None
    await issuer.stop()
    now[0] += jwks.min_interval
    issuer.add("k3")
    assert await answer(node, issuer.token("k3"), "alice") == (503, "cannot check the token now")
    assert await answer(node, issuer.token("k3"), "alice") == (503, "cannot check the token now")
    assert await answer(node, issuer.token("k2"), "alice") == (101, "")
    assert jwks.failures == 1 and node.node.presence.dropped["auth_unavailable"] == 2
    # Back (same port): the next interval's fetch gets k3.
    await issuer.start()
    now[0] += jwks.min_interval
    assert await answer(node, issuer.token("k3"), "alice") == (101, "")


async def test_jwks_unreachable_from_the_start_is_503(node_factory: NodeFactory) -> None:
    node = await node_factory(AUTH_JWKS_URL=f"http://127.0.0.1:{free_port()}/jwks")
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60},
                       ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                       headers={"kid": "k1"})
    assert await answer(node, token, "alice") == (503, "cannot check the token now")
    assert await wt_answer(node, token, "alice") == (503, "cannot check the token now")
    assert await answer(node, "plain-key", "alice") == (403, "publickey rejected")


# -- secrets ------------------------------------------------------------------------------


async def test_tokens_and_the_secret_never_reach_logs_or_dumps(tmp_path: Path) -> None:
    """A real prscd with DEBUG on (one line per message): every token path logs, and the
    log holds no token, no part of a token's signature, and not the secret."""
    tokens = {
        "good": hs256("alice", channels=["room"]),
        "wt": hs256("wendy"),
        "wrong_id": hs256("someone-else"),
        "expired": hs256("alice", exp_in=-3600),
        "bad_signature": hs256("alice", secret="another-secret-with-32-bytes-S3CRET"),
    }
    async with run_prscd(tmp_path, DEBUG="true", AUTH_TOKEN_SECRET=SECRET,
                         WEBTRANSPORT="true") as proc:
        base = f"wss://127.0.0.1:{proc.port}/v1"
        ws = await connect(f"{base}?publickey={tokens['good']}&id=alice", ssl=insecure())
        await ws.send(join_frame("room", "alice"))
        await recv(ws)
        await ws.send(data_frame("room", "m", '"hello"'))
        for name, client_id in (("wrong_id", "alice"), ("expired", "alice"),
                                ("bad_signature", "alice")):
            with pytest.raises(InvalidStatus):
                await connect(f"{base}?publickey={tokens[name]}&id={client_id}",
                              ssl=insecure())
        async with wt_connect(proc.port, f"/v1?publickey={tokens['wt']}&id=wendy") as wt:
            assert wt.status == 200
            wt.send_datagram(join_frame("room", "wendy"))
            await wt.next_message(match=lambda m: m.get("op") == "channel_join")
            proc.proc.send_signal(signal.SIGUSR1)
            await proc.wait_log("state dump")
            proc.proc.send_signal(signal.SIGUSR2)
            await proc.wait_log("runtime stats")
        await ws.send(join_frame("elsewhere", "alice"))  # outside its channels: 4003
        await close_of(ws)
        await proc.wait_log("channel not allowed by the token")
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.proc.wait(), 10)
    text = "\n".join(proc.log)
    # The paths did log (so the check below is not vacuous).
    for needle in ("token sub does not match id (token fingerprint", "token expired",
                   "bad token signature", "frame sid=", "peer open", "state dump"):
        assert needle in text, needle
    leaked = [name for name, token in tokens.items()
              if token in text or token.rsplit(".", 1)[1] in text]
    assert not leaked, f"tokens in the log: {leaked}"
    assert SECRET not in text and "S3CRET" not in text
