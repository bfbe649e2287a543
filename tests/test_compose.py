"""docker-compose.yml validates without a Docker engine and matches what the code really offers."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import yaml

from core.settings import Settings
from waifu.cli import app as cli_app
from worker.app import QUEUES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
WAIFU_SERVICES = ("migrate", "scraper", "worker-io", "worker-cpu", "worker-train", "beat", "flower")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_config(tmp_path: Path, env_text: str) -> subprocess.CompletedProcess:
    """Runs Debian's docker-compose (v1, pure Python: needs no engine) on a copy with the given .env."""
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: .ci/run installs it (apt-get install docker-compose)"
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    (tmp_path / ".env").write_text(env_text)
    return subprocess.run([binary, "-f", str(tmp_path / "docker-compose.yml"), "config"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def filled_env() -> str:
    text = ENV_EXAMPLE.read_text()
    text = text.replace("FLOWER_USER=\n", "FLOWER_USER=admin\n")
    return text.replace("FLOWER_PASSWORD=\n", "FLOWER_PASSWORD=s3cret\n")


def test_compose_file_validates(tmp_path: Path) -> None:
    result = compose_config(tmp_path, filled_env())
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(WAIFU_SERVICES) | {"redis", "postgres"} == set(resolved["services"])
    flower_cmd = " ".join(resolved["services"]["flower"]["command"])
    assert "--basic-auth=admin:s3cret" in flower_cmd


def test_compose_refuses_to_start_without_flower_credentials(tmp_path: Path) -> None:
    result = compose_config(tmp_path, ENV_EXAMPLE.read_text())  # FLOWER_USER left empty
    assert result.returncode != 0
    assert "set FLOWER_USER in .env" in result.stderr


def test_databases_are_not_published_and_state_is_persistent(compose: dict) -> None:
    services = compose["services"]
    assert "ports" not in services["redis"] and "ports" not in services["postgres"]
    assert "--appendonly" in services["redis"]["command"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    assert {"waifu-data", "redis-data", "postgres-data"} <= set(compose["volumes"])


def test_every_service_has_health_restart_and_ordering(compose: dict) -> None:
    services = compose["services"]
    for name in ("redis", "postgres", "flower"):
        assert "healthcheck" in services[name], name
    for name in WAIFU_SERVICES:
        service = services[name]
        assert service.get("restart") in ("unless-stopped", "always", "no"), name
        assert "waifu-data:/data" in service["volumes"], name
        deps = service["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy", name
        if name not in ("migrate", "flower"):
            assert deps["migrate"]["condition"] == "service_completed_successfully", name
            assert deps["postgres"]["condition"] == "service_healthy", name


def waifu_commands() -> dict[str, object]:
    root = typer.main.get_command(cli_app)
    return root.commands  # type: ignore[attr-defined]


def test_each_command_names_a_real_entry_point_and_queue(compose: dict) -> None:
    commands = waifu_commands()
    for name in WAIFU_SERVICES:
        argv = compose["services"][name]["command"]
        if argv[0] == "celery":
            assert argv[1:3] == ["-A", "worker.app"] and argv[3] == "flower", name
            continue
        assert argv[0] == "waifu", name
        command = commands[argv[1]]
        if hasattr(command, "commands"):  # a group, e.g. `waifu db upgrade`
            assert argv[2] in command.commands, name
            command = command.commands[argv[2]]
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        for arg in argv[2:]:
            if arg.startswith("--"):
                assert arg in options, f"{name}: {arg} is not an option of `waifu {argv[1]}`"
        if "--queues" in argv:
            queues = argv[argv.index("--queues") + 1].split(",")
            assert set(queues) <= set(QUEUES), name
    served = {q for s in WAIFU_SERVICES for q in _queues(compose["services"][s]["command"])}
    assert served == set(QUEUES), "every queue needs a worker"


def _queues(argv: list[str]) -> list[str]:
    return argv[argv.index("--queues") + 1].split(",") if "--queues" in argv else []


def test_every_waifu_variable_is_a_known_setting(compose: dict) -> None:
    known = {f"WAIFU_{name.upper()}" for name in Settings.model_fields}
    used = set(re.findall(r"\b(WAIFU_[A-Z_]+)", COMPOSE.read_text() + ENV_EXAMPLE.read_text()))
    assert used, "compose and .env.example set WAIFU_ variables"
    assert used - known == set()
