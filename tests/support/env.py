"""The real services tests use, and where the project is. Imports nothing of the project."""

from __future__ import annotations

import os
from pathlib import Path

# the broker for tests is a dedicated Redis database (override per concurrent run: tests flush it)
TEST_REDIS_URL = os.environ.get("WAIFU_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
# PostgreSQL tests create a throw-away database beside this one
TEST_POSTGRES_URL = os.environ.get("WAIFU_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
