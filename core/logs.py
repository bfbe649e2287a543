"""Logging set-up shared by every process: one line per event, `key=value` pairs after the message."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any


def kv(event: str, **fields: Any) -> str:
    """Render an event as `event key=value ...` (values with spaces are JSON-quoted)."""
    parts = [event]
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if not text or any(c in text for c in ' ="\n'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class CurrentStderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record, not the one at set-up: a test runner
    (click's CliRunner) swaps and closes it, and a handler holding the old one prints "Logging error"."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass  # always the current sys.stderr


def setup_logging(level: str | None = None) -> None:
    level = (level or os.environ.get("WAIFU_LOG_LEVEL") or "INFO").upper()
    root = logging.getLogger()
    if any(getattr(h, "_waifu", False) for h in root.handlers):
        root.setLevel(level)
        return
    handler = CurrentStderr()
    handler._waifu = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp/httpx access chatter drowns the transitions a person wants to read
    for noisy in ("httpx", "httpcore", "aiohttp.access", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
