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
    monkeypatch.setenv("WAIFU_SAFEBOORU_URL", "http://127.0.0.1:8080/")
    monkeypatch.setenv("WAIFU_EXTRA_HOSTS", "cdn.example.org, IMG.example.org")
    monkeypatch.delenv("WAIFU_DATABASE_URL", raising=False)
    s = Settings(_env_file=None)
    assert s.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'waifu.db'}"
    assert s.safebooru_url == "http://127.0.0.1:8080"
    assert s.allowed_hosts == {"127.0.0.1", "cdn.example.org", "img.example.org"}


def test_default_allow_list_is_safebooru_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WAIFU_SAFEBOORU_URL", raising=False)
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
