"""Log lines go to the stderr of the moment: a CLI command run in-process (CliRunner) after another one
logs into its own captured output, never into the closed stream of an earlier run ("--- Logging error ---")."""

from __future__ import annotations

import io
import logging
import sys

from core.logs import CurrentStderr, setup_logging


def test_a_record_goes_to_the_stderr_of_the_moment(monkeypatch) -> None:
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging("INFO")
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_waifu", False))
    assert isinstance(handler, CurrentStderr)
    first.close()  # what CliRunner does once its command returned
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("waifu.test").warning("export done")
    assert "export done" in second.getvalue()
