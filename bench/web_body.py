"""Security review row 5, measured: the peak memory (VmHWM) of a real `waifu web` before and after one 64 MiB
POST to /login (public: no credentials needed), on each source tree given (e.g. main and this branch).

    WAIFU_BROKER_URL=redis://127.0.0.1:6379/9 python -m bench.web_body /work/main .
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BODY = 64 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM")


def probe(tree: Path) -> str:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "WAIFU_DATABASE_URL"}
    env |= {
        "WAIFU_DATA_DIR": tempfile.mkdtemp(prefix="web-body-"),
        "WAIFU_WEB_USER": "admin",
        "WAIFU_WEB_PASSWORD": "a-long-enough-password",
        "PYTHONPATH": str(tree),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "waifu.cli", "web", "--port", str(port)],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        for _ in range(300):
            try:
                httpx.get(f"http://127.0.0.1:{port}/login", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        before = peak_mb(server.pid)
        started = time.monotonic()
        try:
            answer = httpx.post(
                f"http://127.0.0.1:{port}/login",
                content=b"a" * BODY,
                headers={"content-type": "application/x-www-form-urlencoded"},
                timeout=60,
            ).status_code
        except httpx.HTTPError as exc:
            answer = type(exc).__name__
        took = time.monotonic() - started
        time.sleep(0.5)
        return f"{tree}: answer {answer} in {took:.2f} s, server peak memory {before} -> {peak_mb(server.pid)} MB"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    for tree in sys.argv[1:] or ["."]:
        print(probe(Path(tree).resolve()))
