"""Run calls into third-party C code in a child process that can be killed when a call overruns its limit.

Design notes: docs/architecture.md, `detect/killable.py`.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

KILL_WAIT_S = 5.0  # a SIGKILLed child is gone within this; waited for so no zombie is left
START_LIMIT_S = 120.0  # a fresh child imports its modules within this (slow on a loaded machine, never forever)


class TimedOut(RuntimeError):
    def __init__(self, seconds: float):
        super().__init__(f"did not finish within {seconds:g} s")
        self.seconds = seconds


class ChildDied(RuntimeError):
    def __init__(self, exitcode: int | None):
        super().__init__(f"ended its process (exit code {exitcode})")
        self.exitcode = exitcode


class StartFailed(RuntimeError):
    pass


def _serve(conn, preload: tuple[str, ...]) -> None:
    """The child's loop: import `preload`, say so, then run each call it is sent and send back ("ok", result)
    or ("raised", exception)."""
    import importlib

    for name in preload:
        importlib.import_module(name)
    conn.send(("ready", None))
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:  # the parent closed its end: done
            return
        try:
            reply = ("ok", fn(*args))
        except BaseException as exc:  # sent back and raised in the parent: nothing is swallowed here
            reply = ("raised", exc)
        try:
            conn.send(reply)
        except Exception as exc:  # e.g. an unpicklable result or exception: say what it was
            conn.send(("raised", RuntimeError(f"{type(exc).__name__}: {exc} (sending {type(reply[1]).__name__})")))


class Killable:
    """`with Killable(60) as k: k.call(fn, *args)`: fn (importable, picklable args) runs in a child, at most 60 s.

    `preload` names modules the child imports before it counts as started, so the limit of the first call
    covers the call, not the child's imports."""

    def __init__(self, time_limit_s: float, preload: tuple[str, ...] = ()):
        if time_limit_s <= 0:
            raise ValueError("time_limit_s must be positive")
        self.time_limit_s = time_limit_s
        self.preload = preload
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None

    def __enter__(self) -> Killable:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, self.preload), name="waifu-killable", daemon=True)
        self._process.start()
        child.close()
        self._conn = parent
        try:
            ready = parent.poll(START_LIMIT_S) and parent.recv()[0] == "ready"
        except EOFError:
            ready = False
        if not ready:
            exitcode = self._process.exitcode
            self._kill()
            raise StartFailed(f"the child process did not start within {START_LIMIT_S:g} s (exit code {exitcode})")

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._process is None or not self._process.is_alive():
            self.close()
            self._start()
        assert self._conn is not None and self._process is not None
        self._conn.send((fn, args))
        if not self._conn.poll(self.time_limit_s):
            self._kill()
            raise TimedOut(self.time_limit_s)
        try:
            status, value = self._conn.recv()
        except EOFError:  # the child died mid-call
            self._process.join(KILL_WAIT_S)
            exitcode = self._process.exitcode
            self.close()
            raise ChildDied(exitcode) from None
        if status == "raised":
            raise value
        return value

    def _kill(self) -> None:
        assert self._process is not None
        self._process.kill()  # SIGKILL: a call stuck in C runs no handler
        self._process.join(KILL_WAIT_S)
        self.close()

    def close(self) -> None:
        """End the child (a clean exit when idle, a kill when it does not exit) and forget it."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.join(KILL_WAIT_S)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(KILL_WAIT_S)
            self._process = None
