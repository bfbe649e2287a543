"""Passwords never show (security review rows 7, 8 and 16): the real commands run with passwords in the
database and broker URLs, and everything they print or log is searched for them; a PostgreSQL role whose
password needs URL-encoding (`%40`, `%2F`) migrates with `waifu db upgrade`; credentials stay out of
repr()."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from psycopg import sql
from sqlalchemy import create_engine, text

from core.redact import mask_url, redact
from core.settings import Settings
from tests.support.env import PROJECT_ROOT, TEST_POSTGRES_URL, TEST_REDIS_URL

DB_PASSWORD = "Sup@r/Secret%#:9"  # every character URLs care about: @ / % # :
BROKER_PASSWORD = "brokerpw-5f3a9c"


@pytest.fixture
def encoded_role() -> Iterator[str]:
    """A real PostgreSQL role whose password must be URL-encoded, owning a fresh database: its URL.
    (The test server trusts local connections, so the password is not what lets it in: the URL's
    parsing, through every layer, is what is tested.)"""
    name = f"waifu_pct_{uuid.uuid4().hex[:8]}"
    admin = create_engine(
        TEST_POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        # quoted by the driver (DDL takes no parameters; `:9` and `%` must not be read as placeholders)
        create = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(DB_PASSWORD))
        conn.connection.driver_connection.execute(create)
        conn.execute(text(f'CREATE DATABASE "{name}" OWNER "{name}"'))
    host = TEST_POSTGRES_URL.split("@", 1)[1].rsplit("/", 1)[0]
    try:
        yield f"postgresql://{name}:{quote(DB_PASSWORD, safe='')}@{host}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'DROP ROLE IF EXISTS "{name}"'))
        admin.dispose()


def waifu(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WAIFU_")}
    return subprocess.run(
        [sys.executable, "-m", "waifu.cli", *args],
        env={**base, **env},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def leaks(text_: str) -> list[str]:
    forms = {DB_PASSWORD, quote(DB_PASSWORD, safe=""), BROKER_PASSWORD, "r/Secret", "Secret%"}
    return sorted(form for form in forms if form in text_)


def test_a_password_that_needs_encoding_migrates_on_postgresql(encoded_role: str, tmp_path: Path) -> None:
    """Review row 8: `%` in the URL (every encoded password) broke Alembic's configparser."""
    assert "%40" in encoded_role and "%2F" in encoded_role and "%25" in encoded_role
    env = {"WAIFU_DATA_DIR": str(tmp_path), "WAIFU_DATABASE_URL": encoded_role, "WAIFU_BROKER_URL": TEST_REDIS_URL}
    upgraded = waifu(env, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "database at revision" in upgraded.stdout
    healthy = waifu(env, "healthcheck")
    assert healthy.returncode == 0 and healthy.stdout.strip() == "healthy", healthy.stderr
    assert leaks(upgraded.stdout + upgraded.stderr + healthy.stdout + healthy.stderr) == []


def test_no_command_prints_or_logs_a_password(encoded_role: str, tmp_path: Path) -> None:
    """Review row 7: healthcheck printed both URLs (docker keeps that output), `waifu run` logged the
    broker's, and Alembic's errors repeated the database's."""
    data = tmp_path / "data"
    unreachable_db = encoded_role.rsplit("@", 1)[0] + "@127.0.0.1:1/waifu"
    broker = f"redis://:{BROKER_PASSWORD}@127.0.0.1:1/9"
    runs = {
        "healthcheck, nothing reachable": waifu(
            {"WAIFU_DATA_DIR": str(data), "WAIFU_DATABASE_URL": unreachable_db, "WAIFU_BROKER_URL": broker},
            "healthcheck",
        ),
        "healthcheck, database fine": waifu(
            {"WAIFU_DATA_DIR": str(data), "WAIFU_DATABASE_URL": encoded_role, "WAIFU_BROKER_URL": broker},
            "healthcheck",
        ),
        "db upgrade, unreachable": waifu(
            {"WAIFU_DATA_DIR": str(data), "WAIFU_DATABASE_URL": unreachable_db}, "db", "upgrade"
        ),
        "status, unreachable database": waifu(
            {"WAIFU_DATA_DIR": str(data), "WAIFU_DATABASE_URL": unreachable_db}, "status"
        ),
        "run, unreachable broker": waifu(
            {
                "WAIFU_DATA_DIR": str(data),
                "WAIFU_DATABASE_URL": encoded_role,
                "WAIFU_BROKER_URL": broker,
                "WAIFU_EMBEDDED_REDIS": "false",
            },
            "run",
        ),
        "run, unreachable database": waifu(
            {"WAIFU_DATA_DIR": str(data), "WAIFU_DATABASE_URL": unreachable_db, "WAIFU_BROKER_URL": broker},
            "run",
        ),
    }
    # each run says what is wrong, with the URL masked, and ends with an error status
    expected = {
        "healthcheck, nothing reachable": "broker unreachable at redis://:***@127.0.0.1:1/9",
        "healthcheck, database fine": "broker unreachable at redis://:***@127.0.0.1:1/9",
        "db upgrade, unreachable": ":***@127.0.0.1:1/waifu: OperationalError",
        "status, unreachable database": ":***@127.0.0.1:1/waifu: OperationalError",
        "run, unreachable database": ":***@127.0.0.1:1/waifu: OperationalError",
    }
    for name, run in runs.items():
        output = run.stdout + run.stderr
        assert run.returncode != 0, (name, output[-2000:])
        assert "Traceback" not in output, (name, output[-3000:])
        assert leaks(output) == [], (name, output[-2000:])
        if name in expected:
            assert expected[name] in " ".join(output.split()), (name, output[-2000:])
    logs = sorted(data.rglob("*.log"))
    assert logs, "waifu run writes its log file"
    run_log = (data / "logs" / "waifu-run.log").read_text()
    assert "broker unreachable url=redis://:***@127.0.0.1:1/9" in run_log
    for path in logs:
        assert leaks(path.read_text(errors="replace")) == [], path


def test_masking_covers_every_shape_of_url() -> None:
    assert mask_url("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert mask_url("postgresql+psycopg://u:p%40ss@db/x") == "postgresql+psycopg://u:***@db/x"
    assert mask_url("redis://:p@ss/w@host/0") == "redis://:***@host/0"  # unencoded @ and / in the password
    assert mask_url("redis://user@host/0") == "redis://user@host/0"  # a user name alone is no secret
    assert mask_url("sqlite:////data/waifu.db") == "sqlite:////data/waifu.db"
    message = "invalid interpolation syntax in 'postgresql://waifu:Sup%40rSecret@127.0.0.1:1/waifu' at position 22"
    assert (
        redact(message) == "invalid interpolation syntax in 'postgresql://waifu:***@127.0.0.1:1/waifu' at position 22"
    )
    # a password quoted outside a URL is masked too, in both spellings
    url = "postgresql://u:Sup%40rSecret@db/x"
    assert redact("auth failed for Sup@rSecret and Sup%40rSecret", [url]) == "auth failed for *** and ***"


def test_credentials_are_not_in_any_repr() -> None:
    """Review row 16."""
    settings = Settings(
        _env_file=None,
        api_key="KEY123",
        user_id="42",
        sites={"gelbooru": {"api_key": "GKEY", "user_id": "77"}},
    )
    site = settings.site("gelbooru")
    assert (site.api_key, site.user_id) == ("GKEY", "77")  # the values are there for the API client
    assert settings.site("safebooru").api_key == "KEY123"
    for shown in (repr(settings), str(settings), repr(site), repr(settings.all_sites)):
        assert "KEY123" not in shown and "GKEY" not in shown and "'77'" not in shown and "'42'" not in shown
