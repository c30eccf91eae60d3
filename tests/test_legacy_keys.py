"""Keys of the Go prscd (node/config.py LEGACY): each, when set, gets one start-up warning
naming what it did there and what to set here; a credential's value is never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import BY_ENV, LEGACY, Settings, legacy_warnings
from tests.test_cli import run_prscd

SECRET = "token:s3cr3t-cred-value"

#: key -> (value, words its line must hold)
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "WITH_YOMO_ZIPPER": ("true", ("YoMo zipper inside the process", "NATS_URL",
                                  "alone on an embedded bus")),
    "AS_YOMO_ZIPPER": ("true", ("WITH_YOMO_ZIPPER", "NATS_URL", "embedded bus")),
    "YOMO_ZIPPER": ("127.0.0.1:9000", ("host:port of the YoMo zipper", "NATS_URL",
                                       "embedded bus")),
    "YOMO_CREDENTIAL": (SECRET, ("NATS_CREDS_FILE", "NATS_TOKEN", "NATS_USER",
                                 "NATS_PASSWORD")),
    "YOMO_LOG_LEVEL": ("debug", ("YOMO_LOG_LEVEL=debug", "DEBUG=true")),
    "YOMO_LOG_OUTPUT": ("/var/log/yomo.log", ("YoMo SDK's log", "stderr")),
    "YOMO_LOG_ERROR_OUTPUT": ("/var/log/yomo.err", ("error log", "stderr")),
    "YOMO_LOG_FORMAT": ("json", ("text or json", "logfmt")),
    "YOMO_LOG_VERBOSE": ("true", ("source lines", "stderr")),
}


@pytest.mark.unit
def test_every_legacy_key_has_a_case_and_none_is_a_setting() -> None:
    assert set(EXPECTED) == set(LEGACY)
    assert not set(LEGACY) & set(BY_ENV)


@pytest.mark.unit
@pytest.mark.parametrize("env", sorted(EXPECTED))
def test_each_key_gets_one_line_with_its_advice(env: str) -> None:
    value, words = EXPECTED[env]
    lines = legacy_warnings({env: value, "OTEL_SERVICE_NAME": "x"})
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith(f"legacy Go prscd key {env}")
    assert "is ignored" in line and "docs/coming-from-go.md" in line
    for word in words:
        assert word in line, (word, line)


@pytest.mark.unit
def test_values_are_never_shown() -> None:
    # A credential least of all; the others are not needed for the advice.
    lines = legacy_warnings({env: f"v4lue-{env}" for env in LEGACY})
    assert len(lines) == len(LEGACY)
    assert not any("v4lue" in line for line in lines)


@pytest.mark.unit
def test_a_credential_is_never_echoed() -> None:
    lines = legacy_warnings({"YOMO_CREDENTIAL": SECRET, "YOMO_ZIPPER": f"{SECRET}@zipper:9000"})
    assert len(lines) == 2
    for line in lines:
        assert "s3cr3t" not in line


@pytest.mark.unit
@pytest.mark.parametrize(("level", "shown", "advice"), [
    ("debug", "debug", "DEBUG=true"),
    ("DEBUG", "debug", "DEBUG=true"),
    ("info", "info", "info is the default"),
    ("warn", "warn", "no quieter level"),
    ("warning", "warn", "no quieter level"),
    ("error", "error", "no quieter level"),
])
def test_go_log_levels_map(level: str, shown: str, advice: str) -> None:
    [line] = legacy_warnings({"YOMO_LOG_LEVEL": level})
    assert f"YOMO_LOG_LEVEL={shown} " in line
    assert advice in line
    if shown != "debug":
        assert "DEBUG=true" not in line


@pytest.mark.unit
def test_an_unknown_level_is_named_not_echoed() -> None:
    [line] = legacy_warnings({"YOMO_LOG_LEVEL": "loud<script>"})
    assert "loud" not in line
    assert "not a Go level" in line and "DEBUG=true" in line


@pytest.mark.unit
def test_unset_or_blank_keys_and_kept_keys_say_nothing() -> None:
    assert legacy_warnings({}) == []
    assert legacy_warnings({"YOMO_ZIPPER": "  ", "WITH_YOMO_ZIPPER": ""}) == []
    # Keys the Go prscd shares with this one are settings, not extra: never warned about.
    settings = Settings.from_env({"YOMO_SNDR_NAME": "s", "YOMO_RCVR_NAME": "r", "MESH_ID": "eu",
                                  "YOMO_TRACE_JAEGER_ENDPOINT": "", "YOMO_ZIPPER": "z:9000"})
    assert list(settings.extra) == ["YOMO_ZIPPER"]
    assert len(legacy_warnings(settings.extra)) == 1


async def test_a_real_prscd_with_a_go_env_logs_the_advice(tmp_path: Path) -> None:
    go_env = {"WITH_YOMO_ZIPPER": "true", "YOMO_ZIPPER": "127.0.0.1:9000",
              "YOMO_CREDENTIAL": SECRET, "YOMO_LOG_LEVEL": "debug"}
    async with run_prscd(tmp_path, **go_env) as prscd:
        for key in ("WITH_YOMO_ZIPPER", "YOMO_ZIPPER", "YOMO_CREDENTIAL",
                    "YOMO_LOG_LEVEL=debug"):
            line = await prscd.wait_log(f"legacy Go prscd key {key} ")
            assert "level=warning" in line
        await prscd.wait_log("listening")
        warned = [line for line in prscd.log if "legacy Go prscd key" in line]
        assert len(warned) == 4  # once each, at start
        assert not any("s3cr3t" in line for line in prscd.log)
        # Still a lone node on the embedded bus, as the line says.
        assert any("NATS_URL" in line and "embedded bus" in line for line in warned)
