"""A fuzz test's tally (requests tried, answers seen) as a section of its report: `pytest -rP` shows it for
a passed test, and a failure shows it anyway. Not printed past capture: pytest-xdist workers have no terminal,
and the `capsys` fixture there ended in "I/O operation on closed file"."""

from __future__ import annotations

import pytest


def show_summary(request: pytest.FixtureRequest, title: str, lines: list[str]) -> None:
    request.node.add_report_section("call", title, "\n".join(lines))
