"""The longest test files first, so pytest-xdist's workers finish together (longest-processing-time first).

`make test` hands whole files to the workers in collection order (`--dist loadfile --no-loadscope-reorder`):
a long file handed out last keeps one worker busy while the other waits. Each run records how long every
file took in pytest's cache (`.pytest_cache`); the next run collects files longest first. A file the cache
has not seen yet (a fresh clone) is guessed: 15 s per test that starts processes, 1 s per other test (about
the suite's averages). Only the order changes, never which tests run.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

CACHE_NAME = "waifu/file-seconds"
GUESS_S = {True: 15.0, False: 1.0}  # a test with the `processes` marker, and one without


def _guess(items: list[pytest.Item]) -> float:
    return sum(GUESS_S[item.get_closest_marker("processes") is not None] for item in items)


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def longest_files_first(config: pytest.Config, items: list[pytest.Item]) -> None:
    cache = getattr(config, "cache", None)  # None with `-p no:cacheprovider`
    seconds: dict[str, float] = cache.get(CACHE_NAME, {}) if cache is not None else {}
    by_file: dict[str, list[pytest.Item]] = defaultdict(list)
    for item in items:
        by_file[_file(item.nodeid)].append(item)
    order = sorted(by_file, key=lambda file: -seconds.get(file, _guess(by_file[file])))
    items[:] = [item for file in order for item in by_file[file]]


class FileTimes:
    """Adds up each file's setup, call and teardown seconds; stored at the end of a run (the controller's
    only, under pytest-xdist: it sees every worker's reports)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[_file(report.nodeid)] += report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        cache = getattr(session.config, "cache", None)
        if cache is None or hasattr(session.config, "workerinput") or not self.seconds:
            return
        known = cache.get(CACHE_NAME, {})
        cache.set(CACHE_NAME, {**known, **{file: round(s, 1) for file, s in self.seconds.items()}})
