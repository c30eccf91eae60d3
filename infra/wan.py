"""WAN delay proxies: loopback TCP proxies that make local regions as far apart as real ones.

``tc netem`` is not available here, so the delay is added in userspace. Each proxy
forwards one TCP stream per accepted connection and delays every chunk, per direction,
by the link's one-way delay plus a uniform jitter of +-``jitter_ms``, without ever
reordering the bytes of a stream: a chunk is released at
``max(previous release, arrival + delay + jitter)``, so a chunk that drew less jitter
than the one before waits for it, as bytes of one TCP connection would.

Stall mode (a congested link): each chunk is held ``stall_ms`` longer with probability
``stall_fraction``, which stalls that fraction of the bytes on average; everything
behind it in that stream waits too, as in TCP. Stalls apply to gateway links; client
links stall too only with ``stall_clients``.

Links (what ``python -m infra.cluster up --wan`` builds, see infra/cluster.py):

- ``gateway``: one proxy in front of each region's NATS gateway listener, which that
  server also advertises (so gossip never hands out a direct address). The proxy learns
  which region connects from the gateway's first line (``CONNECT {..."gateway":"us-east"}``)
  and delays both directions by that pair's delay from then on; the accepting server's
  first ``INFO``, sent before that line, gets the largest delay of any link into the region.
- ``client``: one proxy per (node region, other region's NATS server): a node that fails
  over to a remote NATS server pays the WAN delay both ways. A node reaches its own
  region's server directly.

Settings (``WanConfig``): ``delays_ms`` (the table below by default, keys ``"a|b"`` in
either order), ``jitter_ms`` (10), ``stall_fraction`` (0), ``stall_ms`` (500),
``stall_clients`` (false). Default one-way delays:

    us-east  <-> eu-west   40 ms
    us-east  <-> ap-south  90 ms
    eu-west  <-> ap-south  60 ms

Run as a process (infra/cluster.py does this, one per region)::

    python -m infra.wan --config STATE/wan.json --region eu-west --stats STATE/wan-eu-west.json

It serves the links whose destination is ``--region``, rewrites ``--stats`` once a second
(counters per link and direction: bytes, chunks, stalled chunks and bytes, connections,
the largest queue) and re-reads the settings of ``--config`` on SIGHUP (a new delay or
stall fraction applies to chunks arriving from then on).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DELAYS_MS: dict[str, float] = {
    "us-east|eu-west": 40.0,
    "us-east|ap-south": 90.0,
    "eu-west|ap-south": 60.0,
}
#: Reading stops while this much is queued in one direction (TCP would push back too).
QUEUE_LIMIT = 4 << 20
#: The gateway's first line is looked for in at most this many bytes.
FIRST_LINE_LIMIT = 64 << 10

_GATEWAY_NAME = re.compile(rb'"gateway"\s*:\s*"([^"]+)"')


def pair(a: str, b: str) -> str:
    return "|".join(sorted((a, b)))


@dataclass
class WanConfig:
    delays_ms: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DELAYS_MS))
    jitter_ms: float = 10.0
    stall_fraction: float = 0.0
    stall_ms: float = 500.0
    stall_clients: bool = False

    def __post_init__(self) -> None:
        # Keys in either order ("eu-west|us-east" == "us-east|eu-west").
        self.delays_ms = {pair(*k.split("|", 1)): float(v) for k, v in self.delays_ms.items()}
        if self.jitter_ms < 0 or self.stall_ms < 0 or not 0 <= self.stall_fraction <= 1:
            raise ValueError("jitter_ms and stall_ms >= 0, 0 <= stall_fraction <= 1")
        if any(v < 0 for v in self.delays_ms.values()):
            raise ValueError("delays must be >= 0 ms")

    def delay_ms(self, a: str, b: str) -> float:
        """One-way delay between two regions (0 within a region or for an unknown pair)."""
        return 0.0 if a == b else self.delays_ms.get(pair(a, b), 0.0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WanConfig:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def parse_delay(text: str) -> tuple[str, float]:
    """``us-east:eu-west=40`` -> (``"eu-west|us-east"``, 40.0): a --delay flag."""
    try:
        regions, ms = text.split("=", 1)
        a, b = regions.split(":", 1)
        return pair(a.strip(), b.strip()), float(ms)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--delay {text!r}: expected REGION:REGION=MS, e.g. us-east:eu-west=40") from None


@dataclass
class Link:
    """One listening proxy: ``listen`` -> ``target`` on 127.0.0.1, into region ``dst``."""

    kind: str  # "gateway" | "client"
    dst: str
    listen: int
    target: int
    src: str = ""  # client links: the node's region; gateway links learn it per connection

    @property
    def name(self) -> str:
        return f"gateway->{self.dst}" if self.kind == "gateway" else f"{self.src}->{self.dst}"


@dataclass
class Counters:
    bytes: int = 0
    chunks: int = 0
    stalled_chunks: int = 0
    stalled_bytes: int = 0
    queue_max_bytes: int = 0
    # The delay each chunk got on top of its arrival (ms): mean and max, for `status`.
    added_ms_sum: float = 0.0
    added_ms_max: float = 0.0

    def view(self) -> dict[str, Any]:
        mean = self.added_ms_sum / self.chunks if self.chunks else 0.0
        return {"bytes": self.bytes, "chunks": self.chunks,
                "stalled_chunks": self.stalled_chunks, "stalled_bytes": self.stalled_bytes,
                "queue_max_bytes": self.queue_max_bytes, "added_ms_mean": round(mean, 2),
                "added_ms_max": round(self.added_ms_max, 2)}


class DelayedPipe:
    """One direction of one TCP stream: chunks written in order, none before its time."""

    def __init__(self, writer: asyncio.StreamWriter, delay_s: Callable[[int], tuple[float, bool]],
                 counters: Callable[[], Counters]) -> None:
        self.writer = writer
        self.delay_s = delay_s  # (chunk size) -> (delay in s, stalled?)
        self.counters = counters  # looked up per chunk: a gateway link's pair is learnt late
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.last_release = 0.0
        self.eof = False
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def feed(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        delay, stalled = self.delay_s(len(data))
        release = max(self.last_release, now + delay)
        self.last_release = release
        self.queue.append((release, data))
        self.queued += len(data)
        c = self.counters()
        c.bytes += len(data)
        c.chunks += 1
        added = (release - now) * 1000
        c.added_ms_sum += added
        c.added_ms_max = max(c.added_ms_max, added)
        if stalled:
            c.stalled_chunks += 1
            c.stalled_bytes += len(data)
        c.queue_max_bytes = max(c.queue_max_bytes, self.queued)
        if self.queued >= QUEUE_LIMIT:
            self._room.clear()
        self._wake.set()

    async def room(self) -> None:
        await self._room.wait()

    def finish(self) -> None:
        """No more chunks: close the writer once the queue is out."""
        self.eof = True
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.queue:
                    if self.eof:
                        break
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                release = self.queue[0][0]
                wait = release - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                now = loop.time()
                out = []
                while self.queue and self.queue[0][0] <= now:  # everything due, in order
                    out.append(self.queue.popleft()[1])
                size = sum(map(len, out))
                self.queued -= size
                if self.queued < QUEUE_LIMIT // 2:
                    self._room.set()
                self.writer.write(b"".join(out))
                await self.writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            self._room.set()
            with contextlib.suppress(Exception):
                self.writer.close()


class WanProxies:
    """The listening proxies of some links, on the running loop; settings swappable."""

    def __init__(self, links: list[Link], config: WanConfig,
                 rng: random.Random | None = None) -> None:
        self.links = links
        self.config = config
        self.rng = rng or random.Random()
        # Counters per link name and direction ("a->b" is bytes travelling from a to b).
        self.counters: dict[str, dict[str, Counters]] = {link.name: {} for link in links}
        self.connections: dict[str, int] = {link.name: 0 for link in links}
        self.unidentified = 0
        self.started = time.time()
        self._servers: list[asyncio.Server] = []
        self._streams: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        for link in self.links:
            server = await asyncio.start_server(
                lambda r, w, link=link: self._accept(link, r, w), "127.0.0.1", link.listen,
                reuse_address=True)
            self._servers.append(server)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for w in list(self._streams):
            w.transport.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    def _delay(self, link: Link, src: Callable[[], str]) -> Callable[[int], tuple[float, bool]]:
        def delay_s(size: int) -> tuple[float, bool]:
            cfg = self.config  # looked up per chunk: SIGHUP swaps it
            a = src()
            base = (cfg.delay_ms(a, link.dst) if a else
                    max((cfg.delay_ms(r, link.dst) for k in cfg.delays_ms
                         for r in k.split("|")), default=0.0))
            ms = base + (self.rng.uniform(-cfg.jitter_ms, cfg.jitter_ms) if base else 0.0)
            stalled = ((link.kind == "gateway" or cfg.stall_clients)
                       and cfg.stall_fraction > 0 and self.rng.random() < cfg.stall_fraction)
            if stalled:
                ms += cfg.stall_ms
            return max(0.0, ms) / 1000, stalled
        return delay_s

    def _count(self, link: Link, a: Callable[[], str], b: Callable[[], str]) -> Counters:
        key = f"{a() or '?'}->{b() or '?'}"
        return self.counters[link.name].setdefault(key, Counters())

    async def _accept(self, link: Link, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", link.target)
        except OSError:  # the server behind is down: so is the link
            writer.transport.abort()
            return
        self.connections[link.name] += 1
        self._streams.update((writer, up_writer))
        src = link.src

        def who() -> str:
            return src

        def dst() -> str:
            return link.dst

        up = DelayedPipe(up_writer, self._delay(link, who), lambda: self._count(link, who, dst))
        down = DelayedPipe(writer, self._delay(link, who), lambda: self._count(link, dst, who))
        tasks = [asyncio.ensure_future(up.run()), asyncio.ensure_future(down.run())]

        async def pump(r: asyncio.StreamReader, pipe: DelayedPipe, first: bool) -> None:
            nonlocal src
            head = b""
            try:
                while data := await r.read(65536):
                    if first and not src:
                        # A gateway link: hold bytes until the first line names the region.
                        head += data
                        if b"\n" not in head and len(head) < FIRST_LINE_LIMIT:
                            continue
                        found = _GATEWAY_NAME.search(head.split(b"\n", 1)[0])
                        src = found.group(1).decode() if found else ""
                        if not src:
                            self.unidentified += 1
                            src = "?"
                        data, head = head, b""
                    pipe.feed(data)
                    await pipe.room()
            except (OSError, ConnectionError):
                pass
            finally:
                if head:
                    pipe.feed(head)
                pipe.finish()

        pumps = [asyncio.ensure_future(pump(reader, up, link.kind == "gateway")),
                 asyncio.ensure_future(pump(up_reader, down, False))]
        try:
            await asyncio.gather(*pumps, *tasks, return_exceptions=True)
        except asyncio.CancelledError:  # the proxy stops: this stream's end, not an error
            for task in (*pumps, *tasks):
                task.cancel()
        finally:
            self._streams.discard(writer)
            self._streams.discard(up_writer)

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "started": self.started, "at": time.time(),
            "config": self.config.to_json(), "unidentified_gateways": self.unidentified,
            "links": {link.name: {"kind": link.kind, "listen": link.listen,
                                  "target": link.target,
                                  "connections": self.connections[link.name],
                                  "directions": {k: c.view() for k, c in
                                                 sorted(self.counters[link.name].items())}}
                      for link in self.links},
        }


def load(path: Path, region: str) -> tuple[WanConfig, list[Link]]:
    data = json.loads(path.read_text())
    links = [Link(**row) for row in data["links"] if row["dst"] == region]
    return WanConfig.from_json(data["config"]), links


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


async def serve(config_path: Path, region: str, stats_path: Path | None) -> None:
    config, links = load(config_path, region)
    proxies = WanProxies(links, config)
    await proxies.start()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def reload() -> None:
        try:
            proxies.config = load(config_path, region)[0]
            print(f"wan {region}: settings reloaded: {proxies.config}", flush=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"wan {region}: settings not reloaded, kept the old ones: {exc}", flush=True)

    loop.add_signal_handler(signal.SIGHUP, reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    print(f"wan {region}: {', '.join(f'{x.name} :{x.listen}->:{x.target}' for x in links)}; "
          f"{config}", flush=True)
    try:
        while not done.is_set():
            if stats_path is not None:
                with contextlib.suppress(OSError):
                    write_json(stats_path, proxies.stats())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1.0)
    finally:
        await proxies.stop()
        if stats_path is not None:
            with contextlib.suppress(OSError):
                write_json(stats_path, proxies.stats())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.wan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path,
                        help="JSON: {config: WanConfig, links: [Link...]} (infra/cluster.py)")
    parser.add_argument("--region", required=True, help="serve the links into this region")
    parser.add_argument("--stats", type=Path, default=None, help="counters, rewritten every s")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.config, args.region, args.stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
