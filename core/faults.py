"""Faults the tests inject into a real worker, right after a step claimed its row: WAIFU_TEST_FAULT=WHERE:HOW.

WHERE is the claimed table and state (`post:downloaded` is face detection, `face:detected` the crop);
HOW is `hang` (sleeps in C with every signal blocked, as a C library that never returns: only SIGKILL ends
it), `sleep` (sleeps in Python: a soft time limit interrupts it), `exit` (the process dies at once, as an
out-of-memory kill) or `kill` (SIGKILL on itself).
Never set outside tests; unset, this costs one environment lookup per claim.
"""

from __future__ import annotations

import os
import signal

VARIABLE = "WAIFU_TEST_FAULT"


def after_claim(table: str, state: str) -> None:
    wanted = os.environ.get(VARIABLE)
    if not wanted:
        return
    where, _, how = wanted.rpartition(":")
    if where != f"{table}:{state}":
        return
    if how == "hang":
        import ctypes

        signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
        ctypes.CDLL(None).sleep(3600)  # in C: no Python signal handler runs until it returns
    elif how == "sleep":
        import time

        time.sleep(3600)
    elif how == "exit":
        os._exit(70)
    elif how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
