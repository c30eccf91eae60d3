"""A server API client for tests that checks every answer it gets against docs/openapi.json.

    api = Api(port, "key")
    status, body = await api.get("/v1/apps/default/channels")

Each answer's status must be documented for its path and method (or be the API's 401 / 404
/ 405 for a path the document does not have), carry ``X-Prscd-MeshID``, and its JSON body
must match the documented schema. ``Api.seen`` lists (method, template, status) checked.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from yarl import URL

from testkit.net import insecure

OPENAPI = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
DOC = json.loads(OPENAPI.read_text())
_URI = "urn:prscd:openapi"
REGISTRY = Registry().with_resource(_URI, Resource(contents=DOC, specification=DRAFT202012))
TEMPLATES = [(re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]*", t) + "$"), t) for t in DOC["paths"]]


def _deref(obj: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in obj:
        node: Any = DOC
        for part in obj["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        obj = node
    return obj


def template_of(path: str) -> str | None:
    path = path.split("?", 1)[0]
    return next((t for rx, t in TEMPLATES if rx.match(path)), None)


def check_answer(method: str, path: str, status: int, headers: Any, body: Any) -> str:
    """Assert the answer is documented; returns the path template ('-' for none)."""
    template = template_of(path)
    operation = DOC["paths"].get(template or "", {}).get(method.lower())
    if operation is None:
        # Not a documented operation: the API's own refusals, as the shared responses.
        names = {401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed"}
        assert status in names, f"{method} {path}: undocumented status {status}"
        response = DOC["components"]["responses"][names[status]]
    else:
        assert str(status) in operation["responses"], \
            f"{method} {template}: status {status} is not documented"
        response = _deref(operation["responses"][str(status)])
    for name, header in response.get("headers", {}).items():
        if _deref(header).get("required"):
            assert name in headers, f"{method} {path} {status}: no {name} header"
    schema = response["content"]["application/json"]["schema"]
    validator = Draft202012Validator({"$ref": _URI + schema["$ref"]}, registry=REGISTRY)
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.path))
    assert not errors, f"{method} {path} {status}: {errors[0].message} in {body}"
    return template or "-"


@dataclass
class Api:
    port: int
    key: str | None = "key"
    tls: bool = True
    seen: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def call(self, method: str, path: str, *, body: Any = None, raw: bytes | None = None,
                   key: str | None = "", headers: dict[str, str] | None = None,
                   ) -> tuple[int, Any, dict[str, str]]:
        """One request; returns (status, JSON body, headers). ``key=None`` sends none."""
        key = self.key if key == "" else key
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        ctx: ssl.SSLContext | bool = insecure() if self.tls else False
        async with aiohttp.ClientSession() as session, session.request(
                method, URL(self.base + path, encoded=True), data=data, headers=sent,
                ssl=ctx) as reply:
            text = await reply.text()
            got_headers = dict(reply.headers)
        assert reply.content_type == "application/json", (reply.status, text)
        answer = json.loads(text)
        template = check_answer(method, path, reply.status, got_headers, answer)
        self.seen.append((method, template, reply.status))
        return reply.status, answer, got_headers

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        status, body, _ = await self.call("GET", path, **kw)
        return status, body

    async def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, answer, _ = await self.call("POST", path, body=body, **kw)
        return status, answer


async def raw_http(port: int, request: bytes, *, tls: bool = True,
                   then: bytes | None = None, timeout: float = 5.0) -> tuple[int, dict[str, str], Any]:
    """Send bytes as they are (for bodies and targets a client library would not send);
    ``then`` is sent only after the answer arrived (a body the node must not wait for)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=insecure() if tls else None,
        server_hostname="localhost" if tls else None)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        length = int(headers.get("Content-Length", "0"))
        body = json.loads(await asyncio.wait_for(reader.readexactly(length), timeout))
        if then is not None:
            writer.write(then)
        return status, headers, body
    finally:
        writer.close()
