"""A webhook receiver for tests (aiohttp.web on a free port): it records every request and
checks its signature the way docs/webhooks.md tells a backend to, with no code of the node."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

SECRET = "whsec-test"


def signed(secret: str, header: str, body: bytes) -> bool:
    """What a backend does (docs/webhooks.md): HMAC-SHA256 over t + "." + body, recent t."""
    parts = dict(p.split("=", 1) for p in header.split(","))
    mac = hmac.new(secret.encode(), parts["t"].encode() + b"." + body, hashlib.sha256)
    return (hmac.compare_digest(mac.hexdigest(), parts["v1"])
            and abs(time.time() - int(parts["t"])) < 300)


@dataclass
class Receiver:
    url: str = ""
    #: Statuses to answer, one per request, then 200; "hang" never answers.
    script: list[int | str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def events(self, accepted_only: bool = True) -> list[dict[str, Any]]:
        return [e for r in self.requests if r["status"] == 200 or not accepted_only
                for e in r["body"]["events"]]

    def seen(self, *kinds: str) -> list[tuple[str, str, str | None]]:
        return [(e["type"], e["channel"], e["user_id"]) for e in self.events()
                if e["type"] in kinds]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = self.script.pop(0) if self.script else 200
        self.requests.append({"status": status, "headers": dict(request.headers),
                              "body": json.loads(body), "at": time.monotonic(),
                              "signed": signed(SECRET, request.headers.get(
                                  "X-Prscd-Signature", "t=0,v1=0"), body)})
        if status == "hang":
            await self.release.wait()
            status = 200
        return web.Response(status=int(status), text="ok")


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    """A receiver on a free port (``rx.url``), stopped at the end."""
    rx = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rx.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rx.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield rx
    finally:
        rx.release.set()
        await runner.cleanup()
