"""Small HTTP endpoints served on the node's port: health, readiness, cert hash, demos.

Each endpoint is a function of the node's :class:`~node.ports.Status` returning an
:class:`HttpReply`; the transport (WebSocket's request hook, or an HTTP/3 GET) turns it
into bytes and adds ``X-Prscd-MeshID`` so an operator behind Anycast can tell which
region answered.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any

from node import admin

if TYPE_CHECKING:
    from node.ports import Status

JSON = "application/json"
#: The Prometheus text format 0.0.4 (what node/metrics.py writes).
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class HttpReply:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, payload: Any) -> HttpReply:
    return HttpReply(status, json.dumps(payload, indent=1).encode() + b"\n", JSON)


def text_reply(status: int, text: str) -> HttpReply:
    return HttpReply(status, text.encode() + b"\n")


def _static(name: str, content_type: str) -> HttpReply | None:
    try:
        body = resources.files("node").joinpath("static", name).read_bytes()
    except (FileNotFoundError, OSError):
        return None
    return HttpReply(HTTPStatus.OK, body, content_type, {"Cache-Control": "no-cache"})


STATIC_PAGES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/websocket.html": ("websocket.html", "text/html; charset=utf-8"),
    "/webtransport.html": ("webtransport.html", "text/html; charset=utf-8"),
    "/presence.js": ("presence.js", "text/javascript; charset=utf-8"),
    "/demo.js": ("demo.js", "text/javascript; charset=utf-8"),
    "/demo.css": ("demo.css", "text/css; charset=utf-8"),
}


LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


def is_local(remote: Any, headers: Mapping[str, str]) -> bool:
    """A loopback client (``remote`` is the socket's peer address), asking for a loopback
    host (not a DNS-rebound name), that no proxy forwarded (proxies add these headers)."""
    try:
        ip = ipaddress.ip_address(str(remote[0]).split("%", 1)[0])
    except (TypeError, IndexError, ValueError):
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    host = headers.get("Host", "")
    host = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
    return (ip.is_loopback and host.lower() in LOOPBACK_HOSTS
            and not any(h in headers for h in ("Forwarded", "X-Forwarded-For", "X-Real-IP")))
ADMIN_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                 "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                 "Cache-Control": "no-store"}


def _admin(node: Status, path: str, local: bool) -> HttpReply:
    """The operations page on this port: only with no server API, to loopback clients."""
    view = node.admin
    if view is None or not view.on_node_port:
        return text_reply(HTTPStatus.NOT_FOUND, "the operations page is not served on this "
                          "port: see the server API (API_PORT) or ADMIN_LOCAL")
    if not local:
        return text_reply(HTTPStatus.FORBIDDEN, "the operations page answers loopback "
                          "clients only (http(s)://127.0.0.1:PORT/admin over TCP, no proxy)")
    if path == admin.OVERVIEW_PATH:
        reply = json_reply(HTTPStatus.OK, view.cached())
    else:
        reply = _static(*admin.PAGES[path]) or text_reply(HTTPStatus.NOT_FOUND, "no page")
    return HttpReply(reply.status, reply.body, reply.content_type,
                     {**reply.headers, **ADMIN_HEADERS})


def route(node: Status, path: str, *, local: bool = False) -> HttpReply:
    """Answer a plain HTTP GET (anything that is not the /v1 WebSocket upgrade); ``local``:
    the client passed :func:`is_local` (only the WebSocket listener's TCP requests can)."""
    if path in admin.PAGES or path == admin.OVERVIEW_PATH:
        return _admin(node, path, local)
    if path == "/health":
        return json_reply(HTTPStatus.OK, node.health())
    if path == "/ready":
        ready, why = node.readiness()
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        return json_reply(status, {"ready": ready, "reason": why, "mesh_id": node.mesh_id})
    if path == "/cert-hash":
        info = node.cert
        if info is None:
            return text_reply(HTTPStatus.NOT_FOUND, "no certificate: TLS is off")
        return json_reply(
            HTTPStatus.OK,
            {
                "algorithm": "sha-256",
                "value": info.cert_sha256_hex,
                "spki_sha256_base64": info.spki_sha256_b64,
                "not_after": info.not_after.isoformat(),
                "generated": info.generated,
            },
        )
    if path == "/v1/nodes":
        # The node directory an edge function reads to send a user to a healthy region.
        return json_reply(HTTPStatus.OK, {"mesh_id": node.mesh_id, "nodes": node.directory()})
    if path == "/metrics":
        return HttpReply(HTTPStatus.OK, node.metrics_text().encode(), METRICS_TYPE)
    if path in STATIC_PAGES:
        reply = _static(*STATIC_PAGES[path])
        if reply is not None:
            return reply
    return text_reply(HTTPStatus.NOT_FOUND, f"not found: {path[:100]}")
