"""A stalled worker's healthcheck ends its container's init, but never one that started too recently
(waifu.selfrestart). Tried on a real process standing in for PID 1: the test machine's own init is not touched."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.support.waiting import wait_until
from waifu.selfrestart import process_uptime_s, restart_for_stall


def _init_stand_in() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def test_uptime_is_read_from_proc() -> None:
    proc = _init_stand_in()
    try:
        time.sleep(1.2)
        assert 1.0 <= process_uptime_s(proc.pid) < 60
    finally:
        proc.kill()
        proc.wait()


def test_a_recently_started_container_is_not_restarted() -> None:
    proc = _init_stand_in()
    try:
        said = restart_for_stall(900, pid=proc.pid)
        assert said.startswith("not restarted: up only"), said
        time.sleep(0.5)
        assert proc.poll() is None, "a container younger than the stall window was ended"
    finally:
        proc.kill()
        proc.wait()


def test_a_container_up_long_enough_gets_sigterm() -> None:
    proc = _init_stand_in()
    try:
        time.sleep(1.2)
        said = restart_for_stall(1.0, pid=proc.pid)
        assert said.startswith(f"restarting: SIGTERM sent to pid {proc.pid}"), said
        wait_until(lambda: proc.poll() is not None, timeout=10, message="the stand-in init to end")
        assert proc.returncode == -15  # SIGTERM, so tini passes it on and the worker shuts down warm
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_an_unreadable_start_time_is_said_not_raised() -> None:
    said = restart_for_stall(0, pid=2**22 + 7)  # above the kernel's pid_max: no such process
    assert said.startswith("not restarted: the container's start time is unreadable"), said
