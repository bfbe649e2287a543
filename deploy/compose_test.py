"""The compose test: build the image, start the whole stack from docker-compose.yml, collect end to end,
survive restarts. Run through `make compose-test` (deploy/compose-test.sh installs podman and the rest).

What it does, in order (each step prints one line; a failed check ends the run with `FAILED: <why>`):
  1. stand-ins of the base images (deploy/test-standins/build.sh), only those not built yet;
  2. a copy of the source tree (tracked and untracked-but-not-ignored files) with a .env made from
     .env.example, so a developer's own .env and data/ are never touched; docker-compose.yml is not edited;
  3. `podman system service` on a socket of its own, driven by Debian's docker-compose (v1, the Docker API);
  4. build, `up -d`, and every check of issue 18 (collection, Flower, web, exec, run --rm retrain, worker
     restart, Redis SIGKILL, stop within the grace period, down/up, backup and restore);
  5. a summary table of the figures; then everything it made is removed (containers, networks, volumes,
     the copy, the service), images stay as the build cache (`make compose-clean` removes them).

Only the standard library: it runs on the machine's python3, not in the project's venv.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROJECT = "waifu-compose-test"
WAIFU_SERVICES = ("scraper", "worker-io", "worker-cpu", "worker-train", "beat", "web", "flower")
WORKERS = ("worker-io", "worker-cpu", "worker-train")
CHARACTERS = ("nishikino_maki", "sakurauchi_riko")
FLOWER = ("flower", "flower-pw-1")
WEB = ("curator", "curator-pw-1")
POSTGRES_PASSWORD = "pg-pw-1"  # used raw in the compose file's URL and by the server: so no URL-special characters
# Settings the test gives the stack through its .env, as a user would; everything else is .env.example's
TEST_SETTINGS = {
    "WAIFU_DEFAULT_SITE_URL": "http://fake-safebooru:18765",
    # a local mirror: its name resolves to a private container address, which downloads refuse otherwise
    "WAIFU_LOCAL_HOSTS": "localhost,fake-safebooru",
    "WAIFU_POLL_INTERVAL_S": "5",  # a character added while the scraper waits is listed within seconds
    # 36 posts take at least 72 s to download: on an idle machine they were otherwise collected within
    # 15 s, too quickly to restart a worker or kill Redis while work is in flight
    "WAIFU_DOWNLOADS_PER_SECOND": "0.5",
    # the retrain must promote a model, not reach an accuracy: a short CNN, and no ImageNet download try
    # (no internet here; the retrain would record why and train from scratch anyway)
    "WAIFU_TRAIN_CNN_BUDGET_S": "20",
    "WAIFU_TRAIN_EPOCHS": "3",
    "WAIFU_BACKBONE_WEIGHTS": "none",
}


class CheckFailed(Exception):
    """One check of the test did not hold; its message is the line printed."""


class NotYet(Exception):
    """What a wait is still waiting for; only the last one is told, when the wait runs out."""


def check(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def not_yet(condition: object, message: str) -> None:
    if not condition:
        raise NotYet(message)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def run(
    argv: list[str],
    *,
    env: dict | None = None,
    timeout: float = 600,
    check_rc: bool = True,
    input_bytes: bytes | None = None,
    stdout=None,
) -> subprocess.CompletedProcess:
    """A command with a time limit; its output is captured and shown only when it fails."""
    proc = subprocess.run(
        argv,
        env=env,
        timeout=timeout,
        input=input_bytes,
        stdin=None if input_bytes else subprocess.DEVNULL,
        stdout=stdout or subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if check_rc and proc.returncode != 0:
        out = proc.stdout.decode(errors="replace")[-3000:] if stdout is None else ""
        raise CheckFailed(
            f"`{' '.join(argv[-8:])}` exited {proc.returncode}:\n{out}{proc.stderr.decode(errors='replace')[-3000:]}"
        )
    return proc


def text(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.decode(errors="replace")


def wait_until(what: str, predicate, timeout: float, interval: float = 1.0):
    """Calls predicate until it returns something true; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except NotYet as exc:
            last_error = f" (last: {str(exc).splitlines()[0]})"
        time.sleep(interval)
    raise CheckFailed(f"{what}: not within {timeout:.0f} s{last_error}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ the engine ---------
class Engine:
    """podman (through its CLI) and docker-compose v1 (through `podman system service`'s Docker API)."""

    def __init__(self, work: Path, src: Path, test_data: Path) -> None:
        self.work, self.src = work, src
        self.socket = work / "podman.sock"
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(DEPLOY / "containers.conf"),
            "DOCKER_HOST": f"unix://{self.socket}",
            "COMPOSE_TEST_DATA": str(test_data),
            "COMPOSE_HTTP_TIMEOUT": "600",
        }
        self.service: subprocess.Popen | None = None
        self.seen: set[str] = set()  # every container id of the project seen during the run

    def start_service(self) -> None:
        log = open(self.work / "podman-service.log", "wb")  # noqa: SIM115 (lives as long as the service)
        self.service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{self.socket}"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_until(
            "podman system service answers",
            lambda: (
                self.socket.exists() and run(["docker-compose", "version"], env=self.env, timeout=30, check_rc=False)
            ),
            30,
            0.2,
        )

    def fair_cpu_share(self, processes: int) -> None:
        """Under cgroup v1 every container sits in podman's `libpod_parent` group, which the kernel weighs as
        ONE process against each process outside it: on a machine busy with other work the whole stack got
        a fortieth of the CPU (a 1 s healthcheck took 75 s). Weigh the group as the `processes` busy
        processes the stack runs, as if they ran on the host; restored to 1024 (the default) at the end."""
        shares = Path("/sys/fs/cgroup/cpu/libpod_parent/cpu.shares")
        with suppress(OSError):
            shares.parent.mkdir(exist_ok=True)
            shares.write_text(str(1024 * processes))

    def stop_service(self) -> None:
        with suppress(OSError):
            Path("/sys/fs/cgroup/cpu/libpod_parent/cpu.shares").write_text("1024")
        if self.service and self.service.poll() is None:
            os.killpg(self.service.pid, signal.SIGTERM)
            try:
                self.service.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.service.pid, signal.SIGKILL)
                self.service.wait(timeout=10)

    def podman(self, *args: str, timeout: float = 120, check_rc: bool = True, **kw) -> subprocess.CompletedProcess:
        return run(["podman", *args], env=self.env, timeout=timeout, check_rc=check_rc, **kw)

    def compose(self, *args: str, timeout: float = 600, check_rc: bool = True, **kw) -> subprocess.CompletedProcess:
        files = ["-f", str(self.src / "docker-compose.yml"), "-f", str(DEPLOY / "compose-test.override.yml")]
        argv = ["docker-compose", "--no-ansi", "-p", PROJECT, "--project-directory", str(self.src), *files, *args]
        return run(argv, env=self.env, timeout=timeout, check_rc=check_rc, **kw)

    def exec(self, service: str, *cmd: str, timeout: float = 120, check_rc: bool = True) -> subprocess.CompletedProcess:
        return self.compose("exec", "-T", service, *cmd, timeout=timeout, check_rc=check_rc)

    def psql(self, sql: str) -> list[list[str]]:
        out = text(self.exec("postgres", "psql", "-U", "waifu", "-d", "waifu", "-AtF", "\t", "-c", sql))
        return [line.split("\t") for line in out.splitlines() if line]

    def containers(self, service: str | None = None, all_states: bool = False) -> list[dict]:
        """podman's view of the project's containers (optionally one service's), inspected."""
        args = ["ps", "--format", "{{.ID}}", "--filter", f"label=com.docker.compose.project={PROJECT}"]
        if service:
            args += ["--filter", f"label=com.docker.compose.service={service}"]
        if all_states:
            args.append("-a")
        ids = text(self.podman(*args)).split()
        if not ids:
            return []
        self.seen.update(ids)
        proc = self.podman("inspect", *ids, check_rc=False)  # a container may vanish in between
        return json.loads(text(proc) or "[]")

    def service_of(self, container: dict) -> str:
        return container["Config"]["Labels"].get("com.docker.compose.service", "?")


# ------------------------------------------------------------------------------ healthchecks -------
class HealthDriver(threading.Thread):
    """Runs the containers' HEALTHCHECKs, as dockerd does. podman schedules them with systemd timers, and
    without systemd (this machine, CI) nobody runs them: every container would stay `starting` and
    `depends_on: service_healthy` would wait forever. Each running container of the project with a
    healthcheck gets `podman healthcheck run` every `interval` (first one `interval` after it started);
    podman itself applies retries and the start period. Every run's duration is kept per service."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(name="health-driver", daemon=True)
        self.engine = engine
        self.stop = threading.Event()
        self.due: dict[str, tuple[str, float]] = {}  # container id -> (StartedAt, next run, monotonic)
        self.busy: set[str] = set()
        self.durations: dict[str, list[float]] = {}
        self.timeouts: dict[str, float] = {}
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            with suppress(Exception):  # a container stopping between list and inspect is normal
                self.tick()

    def tick(self) -> None:
        for c in self.engine.containers():
            health = c["Config"].get("Healthcheck") or {}
            test = health.get("Test") or []
            if not test or test[0] == "NONE" or c["State"]["Status"] != "running":
                continue
            interval = (health.get("Interval") or 30e9) / 1e9
            started = c["State"]["StartedAt"]
            cid = c["Id"]
            with self.lock:
                if cid not in self.due or self.due[cid][0] != started:
                    self.due[cid] = (started, time.monotonic() + interval)
                if cid in self.busy or time.monotonic() < self.due[cid][1]:
                    continue
                self.busy.add(cid)
                self.due[cid] = (started, time.monotonic() + interval)
            service = self.engine.service_of(c)
            self.timeouts[service] = (health.get("Timeout") or 30e9) / 1e9
            threading.Thread(target=self.probe, args=(cid, service), daemon=True).start()

    def stop_all(self) -> None:
        """Stops scheduling and waits for the probes under way (each bounded), so no podman is left."""
        self.stop.set()
        if self.is_alive():
            self.join(timeout=30)
        deadline = time.monotonic() + 70
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.2)

    def probe(self, cid: str, service: str) -> None:
        begin = time.monotonic()
        try:
            self.engine.podman("healthcheck", "run", cid, timeout=60, check_rc=False)
            with self.lock:
                self.durations.setdefault(service, []).append(time.monotonic() - begin)
        except subprocess.TimeoutExpired:
            with self.lock:
                self.durations.setdefault(service, []).append(60.0)
        finally:
            with self.lock:
                self.busy.discard(cid)


# ------------------------------------------------------------------------------ figures ------------
@dataclass
class Figures:
    rows: list[tuple[str, str]] = field(default_factory=list)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> service -> MiB (max)

    def add(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        say(f"figure: {name} = {value}")

    def table(self) -> str:
        width = max(len(n) for n, _ in self.rows)
        lines = [f"| {'figure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
        lines += [f"| {n.ljust(width)} | {v} |" for n, v in self.rows]
        services = sorted({s for phase in self.memory.values() for s in phase})
        if services:
            phases = list(self.memory)
            lines += [
                "",
                "| service | " + " | ".join(f"memory {p} (MiB)" for p in phases) + " |",
                "|---|" + "---:|" * len(phases),
            ]
            for s in services:
                cells = [f"{self.memory[p][s]:.0f}" if s in self.memory[p] else "-" for p in phases]
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def memory_mib(engine: Engine) -> dict[str, float]:
    """Resident memory per service now (MiB; rss + mapped files as the cgroup counts them, page cache of
    read files excluded), summed over a service's containers."""
    usage: dict[str, float] = {}
    for c in engine.containers():
        cid = c["Id"]
        stat = Path(f"/sys/fs/cgroup/memory/libpod_parent/libpod-{cid}/memory.stat")
        if not stat.exists():  # another cgroup layout: take podman's own figure
            raw = json.loads(text(engine.podman("stats", "--no-stream", "--format", "json", cid)))
            value = float(re.sub(r"[^0-9.]", "", str(raw[0]["mem_usage"]).split("/")[0]) or 0)
        else:
            fields = dict(line.split() for line in stat.read_text().splitlines())
            value = (int(fields["total_rss"]) + int(fields.get("total_mapped_file", 0))) / 2**20
        service = engine.service_of(c)
        usage[service] = usage.get(service, 0.0) + value
    return usage


# ------------------------------------------------------------------------------ the test -----------
class ComposeTest:
    def __init__(self, engine: Engine, expected: dict[str, int], ports: dict[str, int]) -> None:
        self.e = engine
        self.expected = expected  # tag -> posts the fake serves for it
        self.ports = ports
        self.fig = Figures()
        self.health = HealthDriver(engine)

    # -------------------------------------------------------------------- helpers ----
    def posts_by_state(self, tag: str) -> dict[str, int]:
        rows = self.e.psql(
            "SELECT p.state, count(*) FROM post p JOIN post_character pc ON pc.post_id = p.id "
            f"JOIN character c ON c.id = pc.character_id WHERE c.tag = '{tag}' GROUP BY p.state"
        )
        return {state: int(n) for state, n in rows}

    def collected(self, tag: str) -> bool:
        """Every post the fake serves for `tag` is listed and terminal; anything but `done` fails the test."""
        states = self.posts_by_state(tag)
        total = sum(states.values())
        if total < self.expected[tag] or set(states) - {"done", "failed", "skipped"}:
            return False
        reasons = self.e.psql(
            "SELECT p.state, p.reason FROM post p JOIN post_character pc ON pc.post_id = p.id JOIN character c "
            f"ON c.id = pc.character_id WHERE c.tag = '{tag}' AND p.state <> 'done' LIMIT 5"
        )
        check(
            states == {"done": self.expected[tag]},
            f"{tag}: posts {states}, expected {self.expected[tag]} done: {reasons}",
        )
        return True

    def snapshot(self) -> dict[str, object]:
        """What must survive restarts: rows, face files (name and size) and the current model."""
        posts = self.e.psql("SELECT id, state FROM post ORDER BY id")
        faces = self.e.psql("SELECT id, state, coalesce(path, '') FROM face ORDER BY id")
        models = self.e.psql("SELECT id, status FROM model_version ORDER BY id")
        files = text(
            self.e.exec("worker-cpu", "sh", "-c", "cd /data && find faces models -type f -printf '%p %s\\n' | sort")
        )
        return {"posts": posts, "faces": faces, "models": models, "files": files.splitlines()}

    def wait_healthy(self, services: tuple[str, ...], timeout: float) -> None:
        def all_healthy() -> bool:
            states = {}
            for s in services:
                cs = self.e.containers(s)
                not_yet(cs, f"{s}: no running container")
                for c in cs:
                    health = c["State"].get("Health") or c["State"].get("Healthcheck") or {}
                    status = health.get("Status", "none")
                    last = (health.get("Log") or [{}])[-1].get("Output", "").strip()[-300:]
                    states[f"{s}/{c['Id'][:8]}"] = status if status == "healthy" or not last else f"{status}: {last}"
            bad = {k: v for k, v in states.items() if v != "healthy"}
            not_yet(not bad, f"not healthy yet: {bad}")
            return True

        wait_until(f"every service healthy ({', '.join(services)})", all_healthy, timeout, 2)

    def flower_get(self, path: str, auth: bool) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports['flower']}{path}")
        if auth:
            token = base64.b64encode(f"{FLOWER[0]}:{FLOWER[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def worker_hosts(self) -> set[str]:
        return {c["Config"]["Hostname"] for s in WORKERS for c in self.e.containers(s)}

    def check_flower(self) -> None:
        status, _ = self.flower_get("/api/workers", auth=False)
        check(status == 401, f"Flower without credentials answered {status}, expected 401")
        expected = self.worker_hosts()

        def lists_every_worker() -> bool:
            status, body = self.flower_get("/api/workers?refresh=1", auth=True)
            not_yet(status == 200, f"Flower with credentials answered {status}")
            hosts = {name.split("@", 1)[1] for name in json.loads(body)}
            not_yet(expected <= hosts, f"Flower lists {sorted(hosts)}, missing workers on {sorted(expected - hosts)}")
            return True

        wait_until("Flower lists every worker", lists_every_worker, 60, 3)
        say(f"ok: Flower 401 without credentials, 200 with them, lists all {len(expected)} workers")

    def web_get(self, path: str, user: str = "", password: str = "", html: bool = False) -> tuple[int, str, str]:
        """(status, final path, body) of a GET to the web service on its published port."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports['web']}{path}")
        if user:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        if html:
            request.add_header("Accept", "text/html")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return (
                    response.status,
                    urllib.parse.urlsplit(response.url).path,
                    response.read().decode(errors="replace"),
                )
        except urllib.error.HTTPError as exc:
            return exc.code, path, exc.read().decode(errors="replace")

    def check_web(self) -> None:
        status, landed, _ = self.web_get("/faces", html=True)
        check(
            (status, landed) == (200, "/login"),
            f"web: a browser without a login got {status} at {landed}, not the login page",
        )
        status, _, _ = self.web_get("/faces")
        check(status == 401, f"web: /faces without credentials answered {status}, expected 401")
        status, _, _ = self.web_get("/faces", WEB[0], "wrong")
        check(status == 401, f"web: a wrong password answered {status}, expected 401")
        status, _, body = self.web_get("/collection", *WEB)
        check(
            status == 200 and CHARACTERS[0] in body,
            f"web: /collection with the credentials answered {status} without {CHARACTERS[0]}",
        )
        say(f"ok: web sends a browser to /login, answers 401 without or with wrong credentials, 200 with {WEB[0]}'s")

    # -------------------------------------------------------------------- phases ----
    def build(self) -> None:
        begin = time.monotonic()
        with open(self.e.work / "build.log", "wb") as log:
            self.e.compose("build", "migrate", timeout=1800, stdout=log)
        self.fig.add("image build time", f"{time.monotonic() - begin:.0f} s")
        size = int(text(self.e.podman("image", "inspect", "--format", "{{.Size}}", "waifu:latest")).strip())
        self.fig.add("image size", f"{size / 1e9:.2f} GB ({size / 2**20:.0f} MiB)")

    def start(self) -> None:
        self.health.start()
        self.t_up = time.monotonic()
        self.e.compose("up", "-d", timeout=900)
        migrate = self.e.containers("migrate", all_states=True)
        check(migrate and migrate[0]["State"]["ExitCode"] == 0, "migrate did not complete with exit code 0")
        finished = migrate[0]["State"]["FinishedAt"]
        for s in WAIFU_SERVICES:
            if s == "flower":  # Flower needs only Redis
                continue
            for c in self.e.containers(s):
                check(
                    c["State"]["StartedAt"] > finished,
                    f"{s} started at {c['State']['StartedAt']}, before migrate finished ({finished})",
                )
        say("ok: migrate completed (exit 0) before every worker, the scraper, beat and the web page started")
        self.wait_healthy(("redis", "postgres", *WAIFU_SERVICES), 600)
        self.fig.add("up -d to every service healthy", f"{time.monotonic() - self.t_up:.0f} s")
        self.fig.memory["at rest"] = memory_mib(self.e)

    def collect_first(self) -> None:
        """The first character, with worker-io and worker-cpu restarted while its posts are in flight."""
        tag = CHARACTERS[0]
        self.e.exec("scraper", "waifu", "characters", "add", tag)
        t_add = time.monotonic()
        peak: dict[str, float] = {}

        first_face: list[float] = []

        def sample(memory: bool = True) -> dict[str, int]:
            for service, mib in (memory_mib(self.e) if memory else {}).items():
                peak[service] = max(peak.get(service, 0), mib)
            if not first_face and int(self.e.psql("SELECT count(*) FROM face WHERE state = 'ready'")[0][0]):
                first_face.append(time.monotonic())
                self.fig.add("up -d to the first collected face", f"{first_face[0] - self.t_up:.0f} s")
                self.fig.add("characters add to the first collected face", f"{first_face[0] - t_add:.0f} s")
            return self.posts_by_state(tag)

        def mid_collection() -> bool:
            # listed, work begun, much still to do: workers hold tasks and queues hold messages. Collecting
            # takes under a minute on an idle machine, so this polls the states alone, nothing slower
            states = sample(memory=False)
            listed = sum(states.values())
            waiting = listed - sum(states.get(s, 0) for s in ("done", "failed", "skipped"))
            return states.get("discovered", 0) < listed and waiting >= 5

        wait_until(f"{tag}: collection under way (posts downloaded, many still to do)", mid_collection, 600, 0.2)
        before = self.posts_by_state(tag)
        begin = time.monotonic()
        self.e.compose("restart", "worker-io", "worker-cpu", timeout=300)
        say(f"restarted worker-io and worker-cpu mid-collection ({before}) in {time.monotonic() - begin:.0f} s")

        def finished() -> bool:
            sample()
            return self.collected(tag)

        # bounds for a machine shared with other work: collecting 36 posts takes about a minute alone
        wait_until(f"{tag}: every post done after the restart", finished, 1500, 2)
        self.fig.add(
            f"characters add to all {self.expected[tag]} posts done (with a worker restart)",
            f"{time.monotonic() - t_add:.0f} s",
        )
        self.fig.memory["collecting (peak)"] = peak
        self.check_crops()
        say(f"ok: {tag}: all {self.expected[tag]} posts done after a worker restart mid-collection")

    def check_crops(self) -> None:
        ready = self.e.psql("SELECT path FROM face WHERE state = 'ready'")
        check(ready, "no face is ready")
        listing = text(self.e.exec("worker-cpu", "sh", "-c", "cd /data && find faces -type f -printf '%p %u\\n'"))
        owners = dict(line.rsplit(" ", 1) for line in listing.splitlines())
        missing = [p for (p,) in ready if p not in owners]
        check(not missing, f"{len(missing)} ready faces have no file in the volume, e.g. {missing[:3]}")
        foreign = {p: u for p, u in owners.items() if u != "waifu"}
        check(not foreign, f"face files not owned by the image's user waifu: {list(foreign.items())[:3]}")
        say(f"ok: {len(ready)} ready faces, each a file in the waifu-data volume owned by waifu")

    def check_status(self) -> None:
        out = text(self.e.exec("worker-io", "waifu", "status", timeout=120))
        check(
            all(t in out for t in CHARACTERS[:1]) and "done" in out, f"waifu status shows no collection:\n{out[:2000]}"
        )
        say("ok: `exec worker-io waifu status` lists the collection")

    def collect_second_with_redis_killed(self) -> None:
        tag = CHARACTERS[1]
        redis = self.e.containers("redis")[0]
        started = redis["State"]["StartedAt"]
        seen: dict[str, int] = {}
        self.e.exec("scraper", "waifu", "characters", "add", tag)

        def kill_when_queued() -> bool:
            # the kill follows the poll that saw work waiting at once: collecting takes under a minute
            states = self.posts_by_state(tag)
            if sum(states.values()) >= 10 and states.get("discovered", 0) >= 5:
                os.kill(redis["State"]["Pid"], signal.SIGKILL)  # redis-server is the container's main process
                seen.update(states)
                return True
            return False

        wait_until(f"{tag}: posts listed and waiting for download", kill_when_queued, 300, 0.2)
        killed = time.monotonic()
        say(f"SIGKILL to redis-server mid-collection (posts of {tag} then: {seen})")

        def back() -> bool:
            cs = self.e.containers("redis")
            return bool(cs) and cs[0]["State"]["StartedAt"] != started and cs[0]["State"]["Status"] == "running"

        wait_until("redis restarted by its restart policy", back, 60, 1)
        wait_until(f"{tag}: every post done after the Redis kill", lambda: self.collected(tag), 1500, 2)
        # a message Redis lost with its last second of writes waits for reconcile (WAIFU_STUCK_AFTER_S, 120 s)
        self.fig.add("Redis SIGKILL to every post done again", f"{time.monotonic() - killed:.0f} s")
        self.check_crops()
        say(f"ok: {tag}: all {self.expected[tag]} posts done after Redis was killed with SIGKILL and came back")

    def retrain(self) -> None:
        begin = time.monotonic()
        # `run --rm` of a service with no running container: docker-compose v1 links a one-off container to
        # its service's running ones, and podman's Docker API refuses links (docs/operations.md)
        proc = self.e.compose("run", "--rm", "migrate", "waifu", "retrain", "--force", "--wait", timeout=1200)
        self.fig.add("run --rm waifu retrain --force --wait", f"{time.monotonic() - begin:.0f} s")
        current = self.e.psql("SELECT id, accuracy FROM model_version WHERE status = 'current'")
        check(len(current) == 1, f"no model promoted after the retrain:\n{text(proc)[-1500:]}")
        self.fig.add("promoted model accuracy (test split)", f"{float(current[0][1]):.3f}")
        say(f"ok: retrain promoted model version {current[0][0]}")

    def backup(self) -> None:
        with open(self.e.work / "waifu.dump", "wb") as out:
            self.e.compose("exec", "-T", "postgres", "pg_dump", "-U", "waifu", "-Fc", "waifu", stdout=out)
        with open(self.e.work / "waifu-data.tar.gz", "wb") as out:
            self.e.compose(
                "run",
                "--rm",
                "--no-deps",
                "-T",
                "--entrypoint",
                "tar",
                "migrate",
                "czf",
                "-",
                "-C",
                "/data",
                ".",
                stdout=out,
            )
        sizes = {p.name: p.stat().st_size for p in self.e.work.glob("waifu*.*")}
        check(all(sizes.values()), f"an empty backup: {sizes}")
        say(f"ok: backup of PostgreSQL (pg_dump -Fc) and the data volume (tar): {sizes}")

    def stop_within_grace(self) -> None:
        begin = time.monotonic()
        self.e.compose("stop", timeout=600)
        took = time.monotonic() - begin
        killed = {}
        for c in self.e.containers(all_states=True):
            service = self.e.service_of(c)
            if service in ("migrate",):
                continue
            code = c["State"]["ExitCode"]
            if code in (137, -1) or c["State"].get("OOMKilled"):
                killed[service] = code
        check(not killed, f"stop had to kill (grace period exceeded or crash): {killed}")
        check(took < 120, f"`stop` took {took:.0f} s")
        self.fig.add("stop (all services)", f"{took:.0f} s")
        say(f"ok: stop ended every service by SIGTERM within its grace period ({took:.0f} s, none killed)")

    def down_up(self, snapshot: dict) -> None:
        self.e.compose("down", timeout=600)
        check(not self.e.containers(all_states=True), "containers left after down")
        begin = time.monotonic()
        self.e.compose("up", "-d", "--scale", "worker-cpu=2", timeout=900)
        self.wait_healthy(("redis", "postgres", *WAIFU_SERVICES), 600)
        self.fig.add("down, then up -d to healthy again", f"{time.monotonic() - begin:.0f} s")
        check(self.snapshot() == snapshot, "posts, faces, files or models differ after down/up")
        say("ok: down then up keeps every post, face, file and the model (volumes)")
        self.check_flower()  # now with two worker-cpu containers

    def restore(self, snapshot: dict) -> None:
        self.e.compose("down", "-v", timeout=600)
        volumes = text(self.e.podman("volume", "ls", "--format", "{{.Name}}")).split()
        check(not [v for v in volumes if v.startswith(PROJECT)], f"volumes left after down -v: {volumes}")
        self.e.compose("up", "-d", "postgres", timeout=300)
        self.wait_healthy(("postgres",), 120)
        with open(self.e.work / "waifu.dump", "rb") as dump:
            run(
                [
                    *self._compose_argv(),
                    "exec",
                    "-T",
                    "postgres",
                    "pg_restore",
                    "-U",
                    "waifu",
                    "-d",
                    "waifu",
                    "--no-owner",
                    "--exit-on-error",
                ],
                env=self.e.env,
                input_bytes=dump.read(),
            )
        with open(self.e.work / "waifu-data.tar.gz", "rb") as archive:
            run(
                [
                    *self._compose_argv(),
                    "run",
                    "--rm",
                    "--no-deps",
                    "-T",
                    "--entrypoint",
                    "tar",
                    "migrate",
                    "xzf",
                    "-",
                    "-C",
                    "/data",
                ],
                env=self.e.env,
                input_bytes=archive.read(),
            )
        self.e.compose("up", "-d", timeout=900)
        self.wait_healthy(("redis", "postgres", *WAIFU_SERVICES), 600)
        check(self.snapshot() == snapshot, "posts, faces, files or models differ after the restore")
        self.check_crops()
        say("ok: restore into empty volumes (pg_restore, tar) brings back every post, face, file and the model")

    def _compose_argv(self) -> list[str]:
        files = ["-f", str(self.e.src / "docker-compose.yml"), "-f", str(DEPLOY / "compose-test.override.yml")]
        return ["docker-compose", "--no-ansi", "-p", PROJECT, "--project-directory", str(self.e.src), *files]

    def check_healthcheck_durations(self) -> None:
        with self.health.lock:
            durations = {s: max(d) for s, d in self.health.durations.items() if d}
        slow = {s: d for s, d in durations.items() if d >= self.health.timeouts.get(s, 30)}
        check(not slow, f"HEALTHCHECKs that reached their timeout: {slow}")
        worst = max(durations, key=durations.get)
        self.fig.add(
            "slowest HEALTHCHECK (max over the run)",
            f"{durations[worst]:.1f} s ({worst}, timeout {self.health.timeouts[worst]:.0f} s)",
        )

    def check_logs(self) -> None:
        logs = text(self.e.compose("logs", "--no-color", "worker-cpu", timeout=120))
        ours = [line for line in logs.splitlines() if "transition post=" in line]
        check(ours, "worker-cpu's logs (stdout/stderr of the container) hold no `transition post=` line")
        say(f"ok: logs reach `docker-compose logs` in our format, e.g. {ours[0].split('|', 1)[-1].strip()[:100]}")


# ------------------------------------------------------------------------------ set-up -------------
def image_names() -> dict[str, str]:
    """The base images the Dockerfile and the compose file use: kind -> name, for the stand-ins."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    compose = (ROOT / "docker-compose.yml").read_text()
    names = {"python": re.findall(r"^FROM\s+(python:\S+)", dockerfile, re.M)}
    for kind in ("redis", "postgres"):
        names[kind] = re.findall(rf"^\s+image:\s+({kind}:\S+)", compose, re.M)
    check(all(len(v) == 1 for v in names.values()), f"expected one base image of each kind: {names}")
    return {k: v[0] for k, v in names.items()}


def copy_sources(src: Path) -> None:
    """The working tree as a fresh clone would have it, plus uncommitted changes: what `git ls-files` lists."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    check((src / "docker-compose.yml").read_bytes() == (ROOT / "docker-compose.yml").read_bytes(), "copy differs")


def write_env(src: Path, ports: dict[str, int]) -> None:
    """.env from .env.example with the required values filled in, as a user is told to do."""
    env = (src / ".env.example").read_text()
    fill = {
        "FLOWER_USER": FLOWER[0],
        "FLOWER_PASSWORD": FLOWER[1],
        "WAIFU_WEB_USER": WEB[0],
        "WAIFU_WEB_PASSWORD": WEB[1],
        "POSTGRES_PASSWORD": POSTGRES_PASSWORD,
        "FLOWER_PORT": str(ports["flower"]),
        "WEB_PORT": str(ports["web"]),
    }
    for key, value in fill.items():
        env, n = re.subn(rf"^{key}=.*$", f"{key}={value}", env, flags=re.M)
        check(n == 1, f".env.example has no {key}= line")
    env += "\n# --- the compose test's settings ---\n"
    for key, value in TEST_SETTINGS.items():
        env, n = re.subn(rf"^{key}=.*$", f"{key}={value}", env, flags=re.M)
        env += "" if n else f"{key}={value}\n"
    (src / ".env").write_text(env)


def test_images() -> tuple[Path, dict[str, int]]:
    """The folder of real test illustrations to mount into the fake, and the posts it serves per tag."""
    registry = (ROOT / "tests" / "support" / "testdata_registry.txt").read_text()
    expected = {t: len(re.findall(rf"^raw/{t}/", registry, re.M)) for t in CHARACTERS}
    folder = os.environ.get("WAIFU_TEST_DATA")
    if not folder:  # fetch (and verify) them through the project's own loader, as the suite does
        venv_python = ROOT / ".venv" / "bin" / "python"
        out = run(
            [
                str(venv_python),
                "-c",
                "from tests.support.testdata import raw_images; print(raw_images()[0][1].parents[2])",
            ],
            timeout=900,
        )
        folder = text(out).strip()
    return Path(folder).resolve(), expected


def cleanup(engine: Engine) -> None:
    """down -v, and whatever it leaves: anonymous volumes of the project's containers, stray containers."""
    mounted = {
        m["Name"]
        for c in engine.containers(all_states=True)
        for m in c.get("Mounts", [])
        if m.get("Type") == "volume" and m.get("Name")
    }
    engine.compose("down", "-v", "--remove-orphans", "--timeout", "30", timeout=300, check_rc=False)
    for c in engine.containers(all_states=True):
        engine.podman("rm", "-f", c["Id"], check_rc=False)
    existing = set(text(engine.podman("volume", "ls", "--format", "{{.Name}}")).split())
    for name in mounted & existing:
        engine.podman("volume", "rm", "-f", name, check_rc=False)
    left = [v for v in text(engine.podman("volume", "ls", "--format", "{{.Name}}")).split() if v in mounted]
    if left:
        print(f"warning: volumes left behind: {left}", flush=True)
    # conmon of an exec session (a healthcheck) whose process hung can outlive its removed container
    for pid in stray_conmons(engine.seen):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stray_conmons(containers: set[str]) -> list[int]:
    """conmon processes monitoring one of `containers` (full ids), found through /proc."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"conmon") and b"-c" in argv:
                cid = argv[argv.index(b"-c") + 1].decode()
                if any(full.startswith(cid) or cid.startswith(full) for full in containers):
                    found.append(int(proc.name))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="leave the stack running and the copy in place")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="waifu-compose-test-", dir="/var/tmp"))
    src = work / "src"
    ok = False
    engine = test = None
    try:
        data, expected = test_images()
        ports = {"web": free_port(), "flower": free_port()}
        begin = time.monotonic()
        names = image_names()
        sys.stdout.flush()
        run(
            ["bash", str(DEPLOY / "test-standins" / "build.sh"), *(f"{k}={v}" for k, v in names.items())],
            env={**os.environ, "CONTAINERS_CONF": str(DEPLOY / "containers.conf")},
            timeout=1800,
            stdout=sys.stdout,  # its progress lines, as they come
        )
        stand_ins = time.monotonic() - begin
        copy_sources(src)
        write_env(src, ports)
        engine = Engine(work, src, data)
        engine.start_service()
        engine.fair_cpu_share(processes=10)
        leftovers = engine.containers(all_states=True)
        check(not leftovers, f"containers of {PROJECT} exist already (an earlier run?): `make compose-clean`")
        test = ComposeTest(engine, expected, ports)
        test.fig.add("stand-in base images (build or reuse)", f"{stand_ins:.0f} s")
        say("building the image from the Dockerfile (docker-compose build)")
        test.build()
        say("docker-compose up -d")
        test.start()
        test.collect_first()
        test.check_status()
        test.check_flower()
        test.check_web()
        test.collect_second_with_redis_killed()
        test.retrain()
        test.check_logs()
        snapshot = test.snapshot()
        test.fig.memory["at rest after collecting"] = memory_mib(engine)
        test.backup()
        test.stop_within_grace()
        test.down_up(snapshot)
        test.restore(snapshot)
        test.check_healthcheck_durations()
        ok = True
    except CheckFailed as exc:
        print(f"FAILED: {exc}", flush=True)
    except subprocess.TimeoutExpired as exc:
        print(f"FAILED: `{' '.join(map(str, exc.cmd))[-200:]}` ran out of its {exc.timeout:.0f} s", flush=True)
    except KeyboardInterrupt:
        print("FAILED: interrupted", flush=True)
    finally:
        if engine and not ok:
            with suppress(Exception), open(work / "compose.log", "wb") as log:
                engine.compose("logs", "--no-color", "--timestamps", timeout=120, check_rc=False, stdout=log)
                print(f"the stack's logs: {work / 'compose.log'}", flush=True)
        if test:
            test.health.stop_all()
        if engine and not args.keep:
            with suppress(Exception):
                cleanup(engine)
            engine.stop_service()
        if test:
            test.fig.add("whole compose test", f"{time.monotonic() - t0:.0f} s")
            print("\n" + test.fig.table(), flush=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            if ok:
                shutil.rmtree(work, ignore_errors=True)
    print("compose test: passed" if ok else f"compose test: FAILED (kept for a look: {work})", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
