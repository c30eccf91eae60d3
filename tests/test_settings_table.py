"""The settings table in node/config.py: the one place each key, default and meaning is
written. ``.env.example`` and docs/configuration.md are generated from it and must match."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from dotenv import dotenv_values

from node import config
from node.config import BY_ENV, TABLE, ConfigError, Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
#: Settings fields that no key of their own sets.
DERIVED = {"public_keys_env", "extra", "environ"}


@pytest.mark.parametrize(("path", "flag"), [(".env.example", "--env-example"),
                                            ("docs/configuration.md", "--markdown")])
def test_generated_files_match_the_table(path: str, flag: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert config.main([flag]) == 0
    generated = capsys.readouterr().out.encode()
    assert (ROOT / path).read_bytes() == generated, (
        f"{path} disagrees with the settings table in node/config.py; regenerate it with "
        f"`.venv/bin/python -m node.config {flag} > {path}`")


def test_every_field_has_one_row_and_every_row_a_field() -> None:
    names = {f.name for f in fields(Settings)}
    rows = [key.name for key in TABLE]
    assert sorted(rows) == sorted(names - DERIVED)
    assert len(BY_ENV) == len(TABLE), "two rows share an environment key"
    for key in TABLE:
        assert key.meaning and key.section, key.env
        assert key.kind in config._KINDS, key.env
        assert bool(key.choices) == (key.kind == "choice"), key.env


def test_defaults_are_the_tables() -> None:
    assert Settings.from_env({}) == Settings()
    # The example shows each default: copied to .env as is, it changes nothing.
    example = {k: v or "" for k, v in dotenv_values(ROOT / ".env.example").items()}
    assert set(example) == set(BY_ENV)
    assert Settings.from_env(example) == Settings()


def test_secrets_stay_out_of_repr_and_errors() -> None:
    secret = {key.name for key in TABLE if key.secret}
    assert {"nats_url", "nats_password", "nats_token", "public_keys",
            "auth_webhook_url"} <= secret
    hidden = {f.name for f in fields(Settings) if not f.repr}
    assert secret | DERIVED <= hidden
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"AUTH_WEBHOOK_URL": "ftp://user:hunter2@x/"})
    assert "hunter2" not in str(err.value) and "AUTH_WEBHOOK_URL" in str(err.value)


@pytest.mark.parametrize(("env", "message"), [
    ({"HEARTBEAT_INTERVAL": "3"}, "NODE_TIMEOUT=3.0: must exceed HEARTBEAT_INTERVAL"),
    ({"HEARTBEAT_INTERVAL": "0"}, "HEARTBEAT_INTERVAL=0.0: must be positive"),
    ({"WT_STOP_CLOSE": "Nope"}, "WT_STOP_CLOSE='nope': expected connection or capsule"),
    ({"NATS_CERT_FILE": "c.pem"}, "NATS_CERT_FILE and NATS_KEY_FILE must be given together"),
    ({"MAX_CONNECTIONS": "1.5"}, "MAX_CONNECTIONS='1.5': expected a int"),
    ({"PUBLIC_KEYS_FILE": "/nonexistent/keys"}, "PUBLIC_KEYS_FILE=/nonexistent/keys: "),
])
def test_checks_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    assert message in str(err.value)


def test_blank_means_default_and_unknown_keys_are_extra(tmp_path: Path) -> None:
    s = Settings.from_env({"PORT": " ", "MESH_ID": "", "OTEL_SERVICE_NAME": "x",
                           "NATS_PASSWORD": " ", "DEBUG": "", "HOME": str(tmp_path)})
    assert (s.port, s.mesh_id, s.nats_password, s.debug) == (8443, "local", " ", False)
    assert s.cert_cache_dir == tmp_path / ".cache" / "prscd"
    assert s.extra == {"OTEL_SERVICE_NAME": "x", "HOME": str(tmp_path)}


def test_load_keeps_the_process_environment(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("MESH_ID=from-file\nPORT=1\n")
    monkeypatch.setenv("PORT", "2")
    monkeypatch.delenv("MESH_ID", raising=False)
    s = config.load(dotenv)
    assert (s.mesh_id, s.port) == ("from-file", 2)
    # What workers are started with: the environment alone, not .env merged into it.
    assert s.environ["PORT"] == "2" and "MESH_ID" not in s.environ
    assert "environ" not in repr(s) and s == s.with_(environ={})
