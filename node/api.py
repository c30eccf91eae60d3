"""The server API: a second listener, for backends (docs/api.md, docs/openapi.json).

    GET  /v1/apps/{app}/channels                     channels and their member counts
    GET  /v1/apps/{app}/channels/{channel}/members   who is in a channel, with their state
    GET  /v1/apps/{app}/users/{id}                   is this id online, where, in which channels
    POST /v1/apps/{app}/channels/{channel}/publish   {"event", "data"} to every member

On aiohttp's web server, on ``API_PORT``, with the node's certificate (plain HTTP when
``TLS=false``), started only when ``API_KEYS`` is set; every request carries one of them as
``Authorization: Bearer <key>``. Answers are mesh-wide: every live node is asked through
mesh/query.py and the answers merge (node/answers.py). Every answer is JSON with
``X-Prscd-MeshID``; every error is ``{"error": "..."}``, and each status is counted.

Bounds: names are checked as the wire protocol checks them before anything is asked; a
publish body is read up to ``MAX_MESSAGE_SIZE`` bytes and no further (413); at most
``max_pending`` mesh queries wait at once (503 beyond).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from ssl import SSLContext
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

from aiohttp import web

from mesh.backend import backend_signal
from mesh.query import QueryBusy
from node import __version__, answers, protocol
from node import admin as admin_pages
from node.endpoints import ADMIN_HEADERS
from node.protocol import ProtocolError, Signalling

if TYPE_CHECKING:
    from mesh.query import MeshQuery
    from node.admin import AdminView
    from node.config import Settings

log = logging.getLogger("prscd.api")

#: App names are not on the wire; they get the rules of client ids (node/protocol.py).
MAX_APP_BYTES = protocol.MAX_CLIENT_ID_BYTES
MAX_EVENT_BYTES = 128
GET, POST = "GET", "POST"


class ApiNode(Protocol):
    """What the API needs from the node (node/server.py implements it)."""

    @property
    def mesh_id(self) -> str: ...

    def count_drop(self, reason: str, n: int = 1) -> None: ...

    async def push(self, sig: Signalling) -> int: ...


class ApiError(Exception):
    """An answer other than success: the status, the reason (the body's ``error``)."""

    def __init__(self, status: int, error: str, *, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(error)
        self.status, self.error = status, error
        self.headers = headers or {}
        self.extra = extra or {}


@dataclass(frozen=True, slots=True)
class Route:
    kind: str  # "channels" | "members" | "user" | "publish"
    app: str
    channel: str = ""
    client_id: str = ""


# -- the request target, names -----------------------------------------------------------


def decode_part(raw: str, what: str) -> str:
    """One percent-encoded path segment (``%2F`` is a '/' inside the name)."""
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise ApiError(HTTPStatus.BAD_REQUEST,
                       f"{what} is not UTF-8 once percent-decoded") from None


def _check_name(name: str, what: str, limit: int) -> str:
    """The one rule for names (``protocol.name_problem``: no control, format or invisible
    characters, UTF-8 only), as peers' ids and channels are checked."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{what} is not valid UTF-8") from None
    if not name:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{what} must not be empty")
    if size > limit:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{what} longer than {limit} bytes")
    if bad := protocol.name_problem(name):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{what} {bad}")
    return name


def check_app(name: str) -> str:
    return _check_name(name, "app", MAX_APP_BYTES)


def check_channel(name: str) -> str:
    """As ``protocol.decode`` checks ``c``: non-empty, at most MAX_CHANNEL_BYTES."""
    return _check_name(name, "channel", protocol.MAX_CHANNEL_BYTES)


def check_id(name: str) -> str:
    """As the connection URL's ``id`` is checked (``protocol.check_client_id``)."""
    try:
        name.encode()
        return protocol.check_client_id(name)
    except UnicodeEncodeError:
        raise ApiError(HTTPStatus.BAD_REQUEST, "id is not valid UTF-8") from None
    except ProtocolError as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from None


def route(method: str, target: str) -> Route:
    """The request target (path, query ignored) as a route, or an ApiError: 404 for a path
    that is not the API's, 405 for another method, 400 for a bad name."""
    path, _ = protocol.split_target(target)
    parts = path.split("/")
    if len(parts) < 5 or parts[:3] != ["", "v1", "apps"]:
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such path: {path[:100]}")
    rest = parts[4:]
    if rest == ["channels"]:
        kind, allowed = "channels", GET
    elif len(rest) == 3 and rest[0] == "channels" and rest[2] == "members":
        kind, allowed = "members", GET
    elif len(rest) == 3 and rest[0] == "channels" and rest[2] == "publish":
        kind, allowed = "publish", POST
    elif len(rest) == 2 and rest[0] == "users":
        kind, allowed = "user", GET
    else:
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such path: {path[:100]}")
    if method != allowed:
        raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method[:16]} not allowed here: "
                       f"use {allowed}", headers={"Allow": allowed})
    app = check_app(decode_part(parts[3], "app"))
    if kind == "user":
        return Route(kind, app, client_id=check_id(decode_part(rest[1], "id")))
    if kind == "channels":
        return Route(kind, app)
    return Route(kind, app, channel=check_channel(decode_part(rest[1], "channel")))


# -- the publish body --------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_publish(body: bytes, app: str, channel: str) -> Signalling:
    """``{"event": "...", "data": <any JSON>}`` as the backend message (tag 0x21)."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ApiError(HTTPStatus.BAD_REQUEST, "body is not UTF-8") from None
    except RecursionError:
        raise ApiError(HTTPStatus.BAD_REQUEST, "body is nested too deeply") from None
    except ValueError as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {str(exc)[:120]}") from None
    if not isinstance(value, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, 'body must be a JSON object {"event", "data"}')
    unknown = sorted(set(value) - {"event", "data"})
    if unknown:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown key {unknown[0][:40]!r}")
    event = value.get("event")
    if not isinstance(event, str) or not event:
        raise ApiError(HTTPStatus.BAD_REQUEST, "event must be a non-empty string")
    try:
        if len(event.encode()) > MAX_EVENT_BYTES:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"event longer than {MAX_EVENT_BYTES} bytes")
        # A lone surrogate ("\ud800") is valid JSON text but not UTF-8: msgpack refuses it.
        json.dumps(value.get("data"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ApiError(HTTPStatus.BAD_REQUEST, "body holds a lone surrogate") from None
    except RecursionError:
        raise ApiError(HTTPStatus.BAD_REQUEST, "data is nested too deeply") from None
    try:
        return backend_signal(app, channel, event, value.get("data"))
    except ProtocolError as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from None


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The body, reading no more than ``limit`` + 1 bytes (413 beyond)."""
    too_big = ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    buf = bytearray()
    while True:
        chunk = await request.content.read(limit + 1 - len(buf))
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise too_big


# -- the listener ------------------------------------------------------------------------


def parse_keys(text: str) -> list[bytes]:
    return [k.strip().encode() for k in text.split(",") if k.strip()]


class ApiListener:
    def __init__(self, settings: Settings, node: ApiNode, query: MeshQuery, *,
                 admin: AdminView | None = None) -> None:
        self.settings, self.node, self.query = settings, node, query
        #: The operations page (node/admin.py): the page without a key, its JSON with one.
        self.admin = admin
        self.keys = parse_keys(settings.api_keys)
        self.body_limit = settings.max_message_bytes
        #: Answers given, by HTTP status.
        self.answered: Counter[int] = Counter()
        self._runner: web.ServerRunner | None = None

    async def start(self, ssl: SSLContext | None) -> list[tuple[str, int]]:
        # aiohttp's low-level server: every request comes here, routed by route() on the
        # raw target (the router would match decoded paths, where %2F is a '/').
        server = web.Server(self._handle, access_log=None)
        # A request in flight at stop waits at most for its mesh query.
        self._runner = web.ServerRunner(server, handle_signals=False,
                                        shutdown_timeout=self.settings.api_query_timeout + 1)
        await self._runner.setup()
        # reuse_port: `prscd --workers N` runs N nodes on one port (node/workers.py).
        site = web.TCPSite(self._runner, self.settings.host or None, self.settings.api_port,
                           ssl_context=ssl, reuse_port=True)
        await site.start()
        addresses = [(str(a[0]), int(a[1])) for a in self._runner.addresses]
        log.info("server API listening port=%d tls=%s keys=%d", addresses[0][1],
                 ssl is not None, len(self.keys))
        return addresses

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def authorized(self, header: str | None) -> bool:
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        key = given.strip().encode()
        ok = False
        for known in self.keys:  # every key compared, in constant time each
            ok |= hmac.compare_digest(key, known)
        return ok

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        started = time.monotonic()
        headers = {"X-Prscd-MeshID": self.node.mesh_id, "X-Prscd-Version": __version__}
        if self.admin is not None and request.path in admin_pages.PAGES:
            return _admin_page(request, headers)  # holds no data: it asks for the key
        body: dict[str, Any] | str
        try:
            status, body = await self._answer(request)
        except ApiError as exc:
            status, body = exc.status, {"error": exc.error, **exc.extra}
            headers.update(exc.headers)
        except Exception:
            log.exception("server API failed path=%s", request.path[:100])
            status, body = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}
        self.answered[int(status)] += 1
        log.debug("api %s %s -> %d in %.1f ms", request.method, request.path[:100], status,
                  (time.monotonic() - started) * 1000)
        text = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
        return web.Response(status=status, headers=headers, content_type="application/json",
                            text=text + "\n")

    async def _answer(self, request: web.BaseRequest) -> tuple[int, dict[str, Any] | str]:
        """(status, body): a dict, or JSON text made already."""
        if not self.authorized(request.headers.get("Authorization")):
            self.node.count_drop("api_unauthorized")
            missing = "Authorization" not in request.headers
            log.info("server API refused remote=%s: %s", request.remote,
                     "no key" if missing else "key not accepted")
            raise ApiError(HTTPStatus.UNAUTHORIZED,
                           "missing bearer key (Authorization: Bearer <key>)" if missing
                           else "bearer key not accepted",
                           headers={"WWW-Authenticate": 'Bearer realm="prscd"'})
        path = request.raw_path.partition("?")[0]
        if self.admin is not None and path == admin_pages.OVERVIEW_PATH:
            if request.method != GET:
                raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{request.method[:16]} not "
                               "allowed here: use GET", headers={"Allow": GET})
            return HTTPStatus.OK, await self.admin.fresh()
        r = route(request.method, request.raw_path)
        if r.kind == "publish":
            sig = parse_publish(await read_body(request, self.body_limit), r.app, r.channel)
            return await self._publish(r, sig)
        if r.kind == "channels":
            g = await self._ask(answers.CHANNELS, {"app": r.app})
            if not answers.app_known(g):
                raise _unknown("app", r.app, g)
            return HTTPStatus.OK, {"channels": answers.merge_channels(g),
                                   "nodes": answers.nodes_view(g)}
        if r.kind == "members":
            g = await self._ask(answers.MEMBERS, {"app": r.app, "channel": r.channel})
            members = answers.merge_members(g)  # JSON texts, spliced (node/answers.py)
            if not members:
                raise (_unknown("channel", r.channel, g) if answers.app_known(g)
                       else _unknown("app", r.app, g))
            nodes = json.dumps(answers.nodes_view(g), separators=(",", ":"))
            return HTTPStatus.OK, f'{{"members":[{",".join(members)}],"nodes":{nodes}}}'
        g = await self._ask(answers.USER, {"app": r.app, "id": r.client_id})
        user = answers.merge_user(g, r.client_id)
        if not user["online"] and not answers.app_known(g):
            raise _unknown("app", r.app, g)
        return HTTPStatus.OK, {**user, "nodes": answers.nodes_view(g)}

    async def _publish(self, r: Route, sig: Signalling) -> tuple[int, dict[str, Any]]:
        g = await self._ask(answers.COUNT, {"app": r.app, "channel": r.channel})
        members, nodes = answers.total_members(g)
        if not members:
            raise (_unknown("channel", r.channel, g) if answers.app_known(g)
                   else _unknown("app", r.app, g))
        await self.node.push(sig)
        return HTTPStatus.ACCEPTED, {"nodes": nodes}

    async def _ask(self, kind: str, body: dict[str, Any]) -> Any:
        try:
            return await self.query.ask(kind, body)
        except QueryBusy as exc:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"busy: {exc}",
                           headers={"Retry-After": "1"}) from None


def _admin_page(request: web.BaseRequest, headers: dict[str, str]) -> web.Response:
    if request.method not in (GET, "HEAD"):
        return web.Response(status=HTTPStatus.METHOD_NOT_ALLOWED, text="use GET\n",
                            headers={**headers, "Allow": GET})
    name, content_type = admin_pages.PAGES[request.path]
    body = resources.files("node").joinpath("static", name).read_bytes()
    return web.Response(body=body, headers={**headers, **ADMIN_HEADERS,
                                            "Content-Type": content_type})


def _unknown(what: str, name: str, g: Any) -> ApiError:
    view = answers.nodes_view(g)
    n, missing = len(view["answered"]), len(view["missing"])
    error = (f"unknown {what} {name[:128]!r}: no member on any of the {n} nodes that "
             f"answered" + (f" ({missing} did not)" if missing else ""))
    return ApiError(HTTPStatus.NOT_FOUND, error, extra={"nodes": view})
