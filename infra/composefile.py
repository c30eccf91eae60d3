"""docker-compose.yml and the Dockerfile read as Docker reads them (no Docker needed).

A YAML loader that refuses duplicate keys (compose does; PyYAML keeps the last one), the
build context less `.dockerignore`, the Dockerfile's stages (COPY, RUN, ENV, WORKDIR,
USER, HEALTHCHECK, ENTRYPOINT/CMD, STOPSIGNAL), compose's port and duration notations.
Used by tests/test_compose.py and infra/composelive.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; compose refuses the file."""


def _mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=StrictLoader)


def ignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore(root: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(excluded, pattern) per line; a later line wins, `!` re-includes, as Docker reads it."""
    rules = []
    path = root / ".dockerignore"
    for raw in path.read_text().splitlines() if path.exists() else []:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((not negated, ignore_regex(line.lstrip("!").strip("/"))))
    return rules


def ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    verdict = False
    for excluded, pattern in rules:
        if any(pattern.match(p) for p in prefixes):
            verdict = excluded
    return verdict


def context_files(root: Path) -> list[str]:
    """The build context: every file Docker would send, relative to ``root``."""
    rules = dockerignore(root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [d for d in dirnames if not ignored(rel_dir + d, rules)]
        files += [rel_dir + f for f in filenames if not ignored(rel_dir + f, rules)]
    return sorted(files)


@dataclass
class Stage:
    name: str
    base: str
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    user: str = "root"
    #: ("copy", sources, dest, from_stage, workdir) or ("run", command, workdir), in order.
    steps: list[tuple[Any, ...]] = field(default_factory=list)
    healthcheck: list[str] | None = None
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    stopsignal: str = "SIGTERM"


def _instructions(text: str) -> list[tuple[str, str]]:
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _argv(rest: str) -> list[str]:
    return json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]


def parse_dockerfile(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for word, rest in _instructions(text):
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=parts[0]))
            continue
        stage = stages[-1]
        if word == "WORKDIR":
            stage.workdir = os.path.join(stage.workdir, rest)
        elif word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                stage.env[key] = value
        elif word == "USER":
            stage.user = rest
        elif word == "COPY":
            args = shlex.split(rest)
            src_stage = next((a.split("=", 1)[1] for a in args if a.startswith("--from=")), None)
            paths = [a for a in args if not a.startswith("--")]
            stage.steps.append(("copy", paths[:-1], paths[-1], src_stage, stage.workdir))
        elif word == "RUN":
            stage.steps.append(("run", rest, stage.workdir))
        elif word == "HEALTHCHECK":
            stage.healthcheck = ["CMD", *json.loads(rest.split(" CMD ", 1)[1].strip())]
        elif word == "ENTRYPOINT":
            stage.entrypoint = _argv(rest)
        elif word == "CMD":
            stage.cmd = _argv(rest)
        elif word == "STOPSIGNAL":
            stage.stopsignal = rest
    return stages


def parse_duration(value: str | int | float | None, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(ms|h|m|s)", value):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


@dataclass(frozen=True)
class Port:
    host_ip: str
    host_port: int
    container_port: int
    protocol: str


def parse_port(spec: str | int | dict[str, Any]) -> Port:
    if isinstance(spec, dict):
        return Port(spec.get("host_ip", ""), int(spec["published"]), int(spec["target"]),
                    spec.get("protocol", "tcp"))
    text, _, protocol = str(spec).partition("/")
    parts = text.rsplit(":", 2) if text.count(":") >= 2 else ["", *text.split(":")]
    if len(parts) == 2:
        parts = ["", parts[0], parts[1]]
    return Port(parts[0], int(parts[1]), int(parts[2]), protocol or "tcp")
