"""Outgoing HTTP (the auth webhook, the token issuer's JWKS, membership webhooks): one way
to make the aiohttp client session, to send URL credentials, and to show a URL in logs.

URLs may carry credentials (``https://user:pass@host/path``): they leave the URL aiohttp
is given, so no error or request info it makes can name them, and go as a Basic auth header
built here (UTF-8, as RFC 7617 allows; aiohttp's own BasicAuth is Latin-1 and deprecated in
its recent releases). Only scheme, host and port of such a URL are ever logged.
"""

from __future__ import annotations

import base64
import ssl
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp

from node import __version__


def redact_url(url: str) -> str:
    """A URL fit for logs: scheme, host and port only."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or '?'}{port}"


def split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """(the URL without its userinfo, the headers that carry it: Basic auth or none)."""
    parts = urlsplit(url)
    target = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    if parts.username is None:
        return target, {}
    secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return target, {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}


def client_session(timeout: float, *, limit: int, headers: dict[str, str] | None = None,
                   ssl_context: ssl.SSLContext | None = None) -> aiohttp.ClientSession:
    """A session for one kind of outgoing call; make it on first use (it belongs to the
    running loop). Answers are small: no compression asked for and none undone, so a cap
    on the body read is a cap on memory; calls are independent: no cookies kept."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit,
                                       ssl=ssl_context if ssl_context is not None else True),
        timeout=aiohttp.ClientTimeout(total=timeout),
        headers={"User-Agent": f"prscd/{__version__}", **(headers or {})},
        skip_auto_headers=("Accept-Encoding",), auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar())
