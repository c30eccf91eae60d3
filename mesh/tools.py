"""``prscd publish`` and ``prscd observe``: backend data in, bus traffic out (needs NATS_URL)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.config import Settings


def add_commands(commands: Any) -> None:
    pub = commands.add_parser(
        "publish", help="push backend data (tag 0x21) to every peer of a channel, on every node",
        description="Publish one event into a channel over the mesh; every peer of the channel "
                    "on every node receives it as channel.subscribe(EVENT) data, from SENDER.")
    pub.add_argument("--app", help="app (realm); default: DEFAULT_APP")
    pub.add_argument("--channel", required=True)
    pub.add_argument("--event", required=True)
    pub.add_argument("--data", default="null", help="JSON value (default null)")
    pub.add_argument("--sender", default="backend",
                     help="the peer id clients see as the sender (default backend)")
    pub.add_argument("--timeout", type=float, default=5.0, help="seconds to reach NATS")
    pub.set_defaults(func=publish_command)

    obs = commands.add_parser(
        "observe", help="print live mesh events, one line each",
        description="Print what crosses the bus: subject, mesh, node, op, channel, p, payload.")
    obs.add_argument("--app", help="only this app")
    obs.add_argument("--channel", help="only this channel")
    obs.add_argument("--nodes", action="store_true", help="also print node heartbeats")
    obs.add_argument("--count", type=int, default=0, help="exit after this many lines")
    obs.add_argument("--timeout", type=float, default=5.0, help="seconds to reach NATS")
    obs.set_defaults(func=observe_command)


def _quiet(settings: Settings) -> None:
    if not settings.debug:
        logging.getLogger("prscd.mesh").setLevel(logging.WARNING)


def _need_nats(settings: Settings, what: str) -> bool:
    if settings.nats_url:
        return True
    print(f"prscd {what}: NATS_URL is not set (in the environment or .env); "
          "backend data and observation go through the NATS mesh", file=sys.stderr)
    return False


def publish_command(settings: Settings, args: argparse.Namespace) -> int:
    if not _need_nats(settings, "publish"):
        return 2
    _quiet(settings)
    from mesh.backend import publish
    from node.protocol import ProtocolError

    app = args.app or settings.default_app
    try:
        subject = asyncio.run(publish(settings, app, args.channel, args.event, args.data,
                                      sender=args.sender, data_is_json=True,
                                      timeout=args.timeout))
    except ProtocolError as exc:
        print(f"prscd publish: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, OSError) as exc:
        print(f"prscd publish: {exc}", file=sys.stderr)
        return 1
    print(f"published subject={subject}", file=sys.stderr)
    return 0


def observe_command(settings: Settings, args: argparse.Namespace) -> int:
    if not _need_nats(settings, "observe"):
        return 2
    _quiet(settings)
    return asyncio.run(_observe(settings, args))


async def _observe(settings: Settings, args: argparse.Namespace) -> int:
    from mesh.backend import describe, observe_subject
    from mesh.bus import BusMessage
    from mesh.liveness import ALL_NODES
    from mesh.nats import NatsBus

    bus = NatsBus(settings, send=False, connect_wait=args.timeout)
    done = asyncio.Event()
    seen = 0
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)

    async def show(message: BusMessage) -> None:
        nonlocal seen
        if done.is_set():
            return
        print(describe(message), flush=True)
        seen += 1
        if args.count and seen >= args.count:
            done.set()

    try:
        await bus.connect()
        if not bus.up:
            print(f"prscd observe: NATS not reachable within {args.timeout:.0f}s",
                  file=sys.stderr)
            return 1
        subjects = [observe_subject(args.app, args.channel)]
        if args.nodes:
            subjects.append(ALL_NODES)
        for subject in subjects:
            await bus.subscribe(subject, show)
        print(f"observing {' '.join(subjects)}", file=sys.stderr, flush=True)
        await done.wait()
    finally:
        await bus.close()
    return 0
