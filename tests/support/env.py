"""The real services tests use, and where the project is. Imports nothing of the project."""

from __future__ import annotations

import os
from pathlib import Path


def _own_redis_database(url: str, worker: str | None) -> str:
    """Tests flush their broker database, so each pytest-xdist worker (gw0, gw1, ...) takes its own: the
    configured database number plus the worker's index. Never wraps round to 0, often someone's real data."""
    if not worker or not worker.startswith("gw"):
        return url
    base, _, database = url.rpartition("/")
    number = (int(database) if database.isdigit() else 0) + int(worker[2:])
    if number > 15:
        raise RuntimeError(
            f"pytest worker {worker} would flush Redis database {number}: set WAIFU_TEST_REDIS_URL lower"
        )
    return f"{base}/{number}"


# the broker for tests is a dedicated Redis database (override per concurrent run: tests flush it)
TEST_REDIS_URL = _own_redis_database(
    os.environ.get("WAIFU_TEST_REDIS_URL", "redis://127.0.0.1:6379/13"), os.environ.get("PYTEST_XDIST_WORKER")
)
# PostgreSQL tests create a throw-away database beside this one
TEST_POSTGRES_URL = os.environ.get("WAIFU_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
