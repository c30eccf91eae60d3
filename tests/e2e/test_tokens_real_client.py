"""The published @yomo/presence 2.2.18 client, unmodified, with tokens as its publicKey:
what it does with each answer (docs/tokens.md writes this down)."""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress
from typing import Any

import jwt
import pytest

from tests.conftest import NodeFactory
from tests.e2e.puppet import PuppetRejected, puppets

SECRET = "real-client-token-secret-32-bytes-min"


def token(sub: str, *, exp_in: float = 300, **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + exp_in), **claims}, SECRET,
                      algorithm="HS256")


async def test_the_real_client_with_tokens(node_factory: NodeFactory) -> None:
    node = await node_factory(AUTH_TOKEN_SECRET=SECRET)
    alice_token = token("alice", channels=["doc-42", "team-7/*"])
    async with puppets() as make:
        alice, bob = await make("alice"), await make("bob")
        await alice.connect(node.url, alice_token, "alice")
        await bob.connect(node.url, token("bob"), "bob")
        await alice.join("doc-42", {"name": "Alice"})
        await bob.join("doc-42", {"name": "Bob"})
        await bob.wait_peers("doc-42", {"alice"})
        await alice.wait_peers("doc-42", {"bob"})

        # The same token with another id, and an expired token: refused handshakes.
        for name, key, status, body in (
                ("mallory", alice_token, 403, "token sub does not match id\n"),
                ("late", token("late", exp_in=-3600), 401, "token expired\n")):
            refused = await make(name)
            with pytest.raises(PuppetRejected) as err:
                await refused.connect(node.url, key, name)
            assert err.value.status == status
            seen = await refused.wait_event(lambda e: e["ev"] == "ws_rejected")
            assert seen["body"] == body  # (createPresence stays pending; the client retries)

        # A channel outside the token: the connection is closed 4003 with the reason.
        mark = alice.mark()
        pending = asyncio.ensure_future(alice.join("secret", {}, timeout=60))
        closed = await alice.wait_event(lambda e: e["ev"] == "ws_close", since=mark,
                                        what="the close")
        assert (closed["code"], closed["reason"]) == (
            4003, "channel not allowed by the token: secret")
        # What the app gets from the client: a 'closed' status with fixed words (no code
        # or reason), once per Channel object on the connection; joinChannel stays pending.
        await alice.wait_for(lambda: len([e for e in alice.events[mark:]
                                          if e["ev"] == "status"]) == 2, what="two statuses")
        statuses = [(e["status"], e["details"]) for e in alice.events[mark:]
                    if e["ev"] == "status"]
        assert statuses == [("closed", "Connection has been disconnected.")] * 2
        await bob.wait_peers("doc-42", set())  # her other channel saw her go
        assert not pending.done()
        pending.cancel()
        with suppress(asyncio.CancelledError):
            await pending
        assert node.node.presence.dropped["channel_forbidden"] == 1

        # >= 4000: no reconnect. The polyfill would reconnect at once after 1001-3999:
        # by the time a new peer has come and been seen, it would have.
        carol = await make("carol")
        await carol.connect(node.url, token("carol"), "carol")
        await carol.join("doc-42", {"name": "Carol"})
        await bob.wait_peers("doc-42", {"carol"})
        assert [e["n"] for e in alice.events if e["ev"] == "ws_open"] == [1]
        assert all(p.client_id != "alice" for p in node.node.presence.peers.values())
