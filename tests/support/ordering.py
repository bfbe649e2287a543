"""The longest test files first, so pytest-xdist's workers finish together (longest-processing-time first).

`make test` hands whole files to the workers in collection order (`--dist loadfile --no-loadscope-reorder`):
a long file handed out last keeps one worker busy while the other waits. Each run records how long every
test took in pytest's cache (`.pytest_cache`); the next run collects files longest first, a file's length
being the sum over the tests it runs this time (so `make test-fast`'s subset and the whole suite are both
judged right). A test the cache has not seen yet (a fresh clone) is guessed: 15 s if it starts processes,
1 s if not (about the suite's averages). Only the order changes, never which tests run.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

CACHE_NAME = "waifu/test-seconds"
GUESS_S = {True: 15.0, False: 1.0}  # a test with the `processes` marker, and one without


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _guess(item: pytest.Item) -> float:
    return GUESS_S[item.get_closest_marker("processes") is not None]


def longest_files_first(config: pytest.Config, items: list[pytest.Item]) -> None:
    cache = getattr(config, "cache", None)  # None with `-p no:cacheprovider`
    seconds: dict[str, float] = cache.get(CACHE_NAME, {}) if cache is not None else {}
    by_file: dict[str, list[pytest.Item]] = defaultdict(list)
    for item in items:
        by_file[_file(item.nodeid)].append(item)
    length = {file: sum(seconds.get(i.nodeid, _guess(i)) for i in tests) for file, tests in by_file.items()}
    items[:] = [item for file in sorted(by_file, key=lambda file: -length[file]) for item in by_file[file]]


class TimesPerTest:
    """Adds up each test's setup, call and teardown seconds; stored at the end of a run (the controller's
    only, under pytest-xdist: it sees every worker's reports)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] += report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        cache = getattr(session.config, "cache", None)
        if cache is None or hasattr(session.config, "workerinput") or not self.seconds:
            return
        known = cache.get(CACHE_NAME, {})
        cache.set(CACHE_NAME, {**known, **{test: round(s, 2) for test, s in self.seconds.items()}})
