"""The configuration contract: environment names, defaults, and the README's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_is_documented_in_the_readme() -> None:
    text = README.read_text()
    missing = [f"WAIFU_{name.upper()}" for name in Settings.model_fields if f"WAIFU_{name.upper()}" not in text]
    assert missing == []


def test_environment_overrides_and_derived_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WAIFU_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("WAIFU_DEFAULT_SITE_URL", "http://127.0.0.1:8080/")
    monkeypatch.setenv("WAIFU_EXTRA_HOSTS", "cdn.example.org, IMG.example.org")
    monkeypatch.delenv("WAIFU_DATABASE_URL", raising=False)
    s = Settings(_env_file=None)
    assert s.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'waifu.db'}"
    assert s.default_site_url == "http://127.0.0.1:8080"
    assert s.allowed_hosts == {"127.0.0.1", "cdn.example.org", "img.example.org"}


def test_default_allow_list_is_safebooru_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WAIFU_DEFAULT_SITE_URL", raising=False)
    monkeypatch.delenv("WAIFU_EXTRA_HOSTS", raising=False)
    s = Settings(_env_file=None)
    assert "safebooru.org" in s.allowed_hosts
    assert all(h.endswith("safebooru.org") for h in s.allowed_hosts)


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAIFU_REQUESTS_PER_SECOND", "0")
    with pytest.raises(ValueError, match="requests_per_second"):
        Settings(_env_file=None)


def test_an_empty_database_url_means_the_default_and_a_bad_one_is_named(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WAIFU_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("WAIFU_DATABASE_URL", "")
    assert Settings(_env_file=None).resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'waifu.db'}"
    monkeypatch.setenv("WAIFU_DATABASE_URL", "waifu:secret@db/waifu")
    with pytest.raises(ValueError, match="database_url") as refused:
        Settings(_env_file=None)
    assert "secret" not in str(refused.value)  # the value (a password, maybe) is not repeated


RENAMED = {  # issue 22: durations end in _s, the default site is named as such; the old names stay a contract
    "sqlite_busy_timeout_s": "SQLITE_BUSY_TIMEOUT",
    "default_site_url": "SAFEBOORU_URL",
    "poll_interval_s": "POLL_INTERVAL",
    "api_backoff_s": "API_BACKOFF",
    "api_backoff_max_s": "API_BACKOFF_MAX",
    "http_timeout_s": "HTTP_TIMEOUT",
    "download_backoff_s": "DOWNLOAD_BACKOFF",
    "stuck_after_s": "STUCK_AFTER",
    "reconcile_interval_s": "RECONCILE_INTERVAL",
    "claim_timeout_s": "CLAIM_TIMEOUT",
    "visibility_timeout_s": "VISIBILITY_TIMEOUT",
    "retry_after_max_s": "RETRY_AFTER_MAX",
    "retrain_interval_s": "RETRAIN_INTERVAL",
}


def _value(name: str, n: int) -> str:
    return f"http://old-{n}.example" if name.endswith("_url") else str(7.0 + n)


@pytest.mark.parametrize("name", sorted(RENAMED))
def test_an_old_variable_name_still_sets_the_field_and_the_new_one_wins(monkeypatch, name: str) -> None:
    old, new = f"WAIFU_{RENAMED[name]}", f"WAIFU_{name.upper()}"
    monkeypatch.delenv(new, raising=False)
    monkeypatch.setenv(old, _value(name, 1))
    assert str(getattr(Settings(_env_file=None), name)) == _value(name, 1)
    monkeypatch.setenv(new, _value(name, 2))
    assert str(getattr(Settings(_env_file=None), name)) == _value(name, 2)
    monkeypatch.delenv(old)
    assert str(getattr(Settings(_env_file=None), name)) == _value(name, 2)


def test_the_old_name_is_read_from_the_env_file_too(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WAIFU_POLL_INTERVAL_S", raising=False)
    monkeypatch.delenv("WAIFU_POLL_INTERVAL", raising=False)
    (tmp_path / ".env").write_text("WAIFU_POLL_INTERVAL=42\n")
    assert Settings(_env_file=tmp_path / ".env").poll_interval_s == 42


def test_a_renamed_field_is_set_by_its_name_in_code() -> None:
    assert Settings(_env_file=None, poll_interval_s=5).poll_interval_s == 5


def test_a_bad_old_name_is_reported_under_the_name_that_was_set(monkeypatch) -> None:
    from pydantic import ValidationError

    from core.settings import settings_problem

    monkeypatch.delenv("WAIFU_HTTP_TIMEOUT_S", raising=False)
    monkeypatch.setenv("WAIFU_HTTP_TIMEOUT", "-3")
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None)
    assert settings_problem(refused.value).startswith("bad setting WAIFU_HTTP_TIMEOUT_S or WAIFU_HTTP_TIMEOUT: ")


def test_every_duration_ends_in_s() -> None:
    """A field whose description speaks of seconds, a delay, a wait or a timeout is named ..._s."""
    words = ("second", "delay", "wait", "timeout", "time limit")
    not_durations = {"download_min_rate", "max_attempts", "run_restart_limit"}  # bytes/s and counts
    durations = [
        name
        for name, field in Settings.model_fields.items()
        if name not in not_durations and any(w in (field.description or "").lower() for w in words)
    ]
    assert durations and [n for n in durations if not n.endswith("_s")] == []
