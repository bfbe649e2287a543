"""A fuzz test's tally (requests tried, answers seen) where a person reads it: straight to the terminal in
a plain run; under pytest-xdist, whose workers have no terminal, as a report section (`pytest -rP`)."""

from __future__ import annotations

import os

import pytest


def show_summary(
    request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str], title: str, lines: list[str]
) -> None:
    text = "\n".join(lines)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        request.node.add_report_section("call", title, text)
        return
    with capsys.disabled():
        print(f"\n{title}\n{text}")
