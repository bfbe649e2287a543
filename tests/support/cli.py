"""`waifu ARGS` as a person runs it: a real process, with the test's environment."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.env import PROJECT_ROOT


async def run_cli(env: dict[str, str], *args: str, timeout: float = 300) -> tuple[int, str, str]:
    """Runs `waifu ARGS` without blocking the event loop (the fake site serves from it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "waifu.cli",
        *args,
        env={**os.environ, **env},
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def run_cli_blocking(
    env: dict[str, str], *args: str | Path, columns: int | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`run_cli` for tests with no event loop of their own; `columns` sets the terminal width."""
    extra = {"COLUMNS": str(columns)} if columns else {}
    return subprocess.run(
        [sys.executable, "-m", "waifu.cli", *map(str, args)],
        env={**os.environ, **env, **extra},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def json_lines(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]
