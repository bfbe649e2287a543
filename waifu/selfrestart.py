"""Restart a stalled worker's container from its own healthcheck.

Docker and compose restart a container that exits, not one that turns unhealthy. So a worker's healthcheck,
on a stall, ends the container's init (PID 1, tini in our image) with SIGTERM; `restart: unless-stopped`
then starts it again. Never sooner than `min_uptime_s` after the container started: a worker restarted for a
stall gets that long to move a row before the same stall can restart it again.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

INIT_PID = 1


def process_uptime_s(pid: int, proc: Path = Path("/proc")) -> float:
    """Seconds since `pid` started, from /proc (its start time is in clock ticks after boot)."""
    fields = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    started_ticks = int(fields[19])  # field 22 of stat; the split drops the first two
    boot_uptime = float((proc / "uptime").read_text().split()[0])
    return boot_uptime - started_ticks / os.sysconf("SC_CLK_TCK")


def restart_for_stall(min_uptime_s: float, pid: int = INIT_PID) -> str:
    """SIGTERM to the container's init when it has run at least `min_uptime_s`; says what it did."""
    try:
        uptime = process_uptime_s(pid)
    except (OSError, ValueError, IndexError) as exc:
        return f"not restarted: the container's start time is unreadable ({exc})"
    if uptime < min_uptime_s:
        return f"not restarted: up only {uptime:.0f} s (a restart waits {min_uptime_s:.0f} s)"
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError as exc:
        return f"not restarted: SIGTERM to pid {pid} refused ({exc})"
    return f"restarting: SIGTERM sent to pid {pid} after {uptime:.0f} s up"
