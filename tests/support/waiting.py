"""Polling with a deadline: the only way tests wait for another process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest


def wait_until(
    predicate: Callable[[], bool], timeout: float = 120.0, interval: float = 0.25, message: str = "condition"
) -> None:
    """Polls `predicate` until true; fails the test with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {message}")


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """`wait_until` for async tests: the event loop (e.g. the fake site) keeps running while it waits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.5)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")
