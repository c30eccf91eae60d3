"""The processes infra/composelive.py starts beside the services.

``forward``: the published ports, like Docker's userland proxy: TCP and UDP forwarders on
listening sockets it inherits (bound to 127.0.0.1 in the host's network namespace), while
it runs in the namespace of the bridge, where the services' addresses are.
``otlp-sink``: an OTLP/HTTP receiver standing in for Jaeger, one JSON line per span.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any


async def _tcp_forward(listener: socket.socket, target: tuple[str, int]) -> None:
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(serve, sock=listener)
    await server.serve_forever()


class _UdpUpstream(asyncio.DatagramProtocol):
    def __init__(self, front: asyncio.DatagramTransport, client: Any) -> None:
        self.front, self.client = front, client

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.front.sendto(data, self.client)


class _UdpFront(asyncio.DatagramProtocol):
    """Like Docker's userland proxy: one upstream socket per client address."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.upstreams: dict[Any, asyncio.DatagramTransport] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        upstream = self.upstreams.get(addr)
        if upstream is not None:
            upstream.sendto(data)
            return
        asyncio.get_running_loop().create_task(self._open(addr, data))

    async def _open(self, addr: Any, first: bytes) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpUpstream(self.transport, addr), remote_addr=self.target)  # type: ignore[arg-type]
        self.upstreams[addr] = transport
        transport.sendto(first)


async def _forward(tcp: list[str], udp: list[str]) -> None:
    loop = asyncio.get_running_loop()
    tasks = []
    for spec in tcp:
        fd, _, target = spec.partition("=")
        host, _, port = target.rpartition(":")
        sock = socket.socket(fileno=int(fd))
        tasks.append(asyncio.ensure_future(_tcp_forward(sock, (host, int(port)))))
    for spec in udp:
        fd, _, target = spec.partition("=")
        host, _, port = target.rpartition(":")
        sock = socket.socket(fileno=int(fd))
        await loop.create_datagram_endpoint(lambda h=host, p=port: _UdpFront((h, int(p))),
                                            sock=sock)
    await asyncio.gather(*tasks, asyncio.Event().wait())


def _otlp_sink(port: int, out: Path) -> None:
    """OTLP/HTTP traces in, one JSON line per span out (what Jaeger would show)."""
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        if body[:2] == b"\x1f\x8b":  # Content-Encoding: gzip, when not undone already
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest.FromString(body)
        lines = []
        for resource_spans in export.resource_spans:
            res = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            lines += [json.dumps({
                "node": res.get("service.instance.id"), "mesh": res.get("prscd.mesh_id"),
                "name": span.name, "trace_id": span.trace_id.hex(),
                "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                "attrs": {a.key: a.value.string_value for a in span.attributes}})
                for scope in resource_spans.scope_spans for span in scope.spans]
        with out.open("a") as f:
            f.write("".join(line + "\n" for line in lines))
        return web.Response(content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    web.run_app(app, port=port, print=None, handle_signals=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.composelive")
    commands = parser.add_subparsers(dest="command", required=True)
    forward = commands.add_parser("forward", help="published ports: FD=HOST:PORT each")
    forward.add_argument("--tcp", action="append", default=[])
    forward.add_argument("--udp", action="append", default=[])
    sink = commands.add_parser("otlp-sink", help="an OTLP/HTTP receiver writing JSON lines")
    sink.add_argument("--port", type=int, default=4318)
    sink.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "forward":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        asyncio.run(_forward(args.tcp, args.udp))
    else:
        _otlp_sink(args.port, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
