"""The ``prscd`` command: with no arguments, run a node."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import re
import signal
import sys
import time
from typing import Any

from node import __version__
from node.config import ConfigError, Settings, legacy_warnings, load

log = logging.getLogger("prscd")


class LogfmtFormatter(logging.Formatter):
    """One line per record: ``ts=... level=... logger=... msg``; exceptions folded in."""

    def format(self, record: logging.LogRecord) -> str:
        ts = self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"
        level = record.levelname.lower()
        line = f"ts={ts} level={level} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + repr(self.formatException(record.exc_info))
        return line


_PUBLICKEY = re.compile(r"(publickey=)[^&\s\"']*", re.IGNORECASE)
_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s\"']+@", re.IGNORECASE)


class RedactSecrets(logging.Filter):
    """Last line of defence for what libraries log (websockets' debug log shows each
    request line, ``?publickey=...`` included): public keys and URL credentials are
    replaced before any handler writes the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "publickey=" in message or "@" in message:
            redacted = _USERINFO.sub(r"\1<redacted>@", _PUBLICKEY.sub(r"\1<redacted>", message))
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = LogfmtFormatter()
    formatter.converter = time.gmtime  # the "Z" in the timestamps
    handler.setFormatter(formatter)
    handler.addFilter(RedactSecrets())
    if not debug:
        handler.addFilter(RepeatLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # Library chatter (handshake failures from scanners, etc.) only when debugging. aioquic
    # logs under "quic" and "http3" (three INFO lines per QUIC connection), aiohttp one
    # access line per request.
    for name in ("websockets", "aioquic", "quic", "http3", "nats", "asyncio", "aiohttp",
                 "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)


class RepeatLimit(logging.Filter):
    """Warnings and errors are rate-limited per logger and message template: at most
    ``burst`` lines each ``interval`` seconds, then one line saying how many were left out
    (anything a client can cause must not be able to flood the log). DEBUG logs all."""

    def __init__(self, burst: int = 10, interval: float = 10.0,
                 clock: Any = time.monotonic) -> None:
        super().__init__()
        self.burst, self.interval, self.clock = burst, interval, clock
        #: (logger, template) -> [window start, lines in the window, lines left out]
        self._seen: dict[tuple[str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg)[:200])
        now = self.clock()
        seen = self._seen.get(key)
        if seen is None or now - seen[0] >= self.interval:
            if len(self._seen) >= 1000:  # a bounded table: templates, not messages
                self._seen.clear()
            left_out = int(seen[2]) if seen is not None else 0
            self._seen[key] = [now, 1, 0]
            if left_out:
                record.msg = f"{record.getMessage()} (and {left_out} like it left out in " \
                             f"the last {self.interval:g} s)"
                record.args = None
            return True
        if seen[1] < self.burst:
            seen[1] += 1
            return True
        seen[2] += 1
        return False


async def run_node(settings: Settings) -> int:
    from node.app import App
    from node.introspect import install_signal_handlers, remove_pid_file, write_pid_file
    from node.tls import ensure_certificate

    # A .env brought from the Go prscd would otherwise give a lone node without a word.
    for line in legacy_warnings(settings.extra):
        log.warning("%s", line)
    from node.transports.handshakes import fit_open_files

    connections, handshakes, fitted = fit_open_files(settings.max_connections,
                                                     settings.max_handshakes)
    if fitted:  # answer 503 before accept() fails for want of descriptors
        log.warning("%s", fitted)
        settings = dataclasses.replace(settings, max_connections=connections,
                                       max_handshakes=handshakes)
    cert = None
    if settings.tls:
        cert = ensure_certificate(settings.cert_file, settings.key_file,
                                  settings.cert_cache_dir, settings.domain)
        log.info("certificate file=%s generated=%s not_after=%s spki_sha256=%s",
                 cert.cert_file, cert.generated, cert.not_after.isoformat(),
                 cert.spki_sha256_b64)
    else:
        log.warning("TLS is off: serve behind a TLS-terminating proxy only")
    app = App(settings, cert)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    install_signal_handlers(loop, app.node)
    await app.start()
    pid_path = settings.pid_path()
    write_pid_file(pid_path)
    scheme = "https" if cert else "http"
    # Behind a published or forwarded port (docker compose) users reach PUBLIC_URL.
    base = (settings.public_url.rstrip("/").removesuffix("/v1") if settings.public_url
            else f"{scheme}://127.0.0.1:{app.port}")
    log.info("listening url=%s/v1 health=%s/health pid_file=%s", base, base, pid_path)
    try:
        await stop.wait()
        if settings.drain_seconds > 0:
            # Behind Anycast / Geo-DNS: fail health checks first, keep serving while the
            # balancer moves traffic away; a second signal cuts the drain short.
            app.node.begin_drain()
            stop.clear()
            log.info("signal received: draining for up to %.1f s (over once no peer is left)",
                     settings.drain_seconds)
            waits = {asyncio.ensure_future(stop.wait()),
                     asyncio.ensure_future(app.node.no_peers_left())}
            done, pending = await asyncio.wait(waits, timeout=settings.drain_seconds,
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            log.info("drain over: %s", "second signal" if stop.is_set() else
                     "no peer left" if done else "time up")
        log.info("stopping: closing peers with 1001")
        await asyncio.wait_for(app.stop(), timeout=4.5)
    except TimeoutError:
        log.error("stop took longer than 4.5 s: exiting anyway")
    finally:
        remove_pid_file(pid_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prscd", description="Presence server for @yomo/presence")
    parser.add_argument("--version", action="version", version=f"prscd {__version__}")
    parser.add_argument("--env-file", default=".env", help="dotenv file to read (default .env)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="run N node processes sharing the port (SO_REUSEPORT), each its "
                             "own mesh member; needs NATS_URL (default 1)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     help="run (the default), publish, observe")
    commands.add_parser("run", help="run a node (what `prscd` with no command does)")
    from mesh.tools import add_commands

    add_commands(commands)
    args = parser.parse_args(argv)
    try:
        settings = load(args.env_file)
    except ConfigError as exc:
        print(f"prscd: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.debug)
    if args.command not in (None, "run"):
        return int(args.func(settings, args))
    if args.workers != 1:
        from node.workers import check, supervise

        problem = check(settings, args.workers)
        if problem:
            print(f"prscd: {problem}", file=sys.stderr)
            return 2
        return supervise(settings, args.workers, args.env_file, settings.environ)
    try:
        import uvloop  # optional: the [fast] extra
    except ImportError:
        uvloop = None
    try:
        # Some settings can only be checked when used (a token key file): same answer.
        return (uvloop.run if uvloop else asyncio.run)(run_node(settings))
    except ConfigError as exc:
        print(f"prscd: configuration error: {exc}", file=sys.stderr)
        return 2
