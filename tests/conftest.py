"""The test session: the environment every test starts from, and the shared fixtures (tests/support/fixtures.py).

The broker for tests is a dedicated Redis database (default 127.0.0.1:6379/13, override with
WAIFU_TEST_REDIS_URL; each pytest-xdist worker takes the next one, tests/support/env.py); PostgreSQL
tests create their databases next to `test` (override the server with WAIFU_TEST_POSTGRES_URL).
"""

from __future__ import annotations

import os

import pytest

from tests.support.env import TEST_REDIS_URL

# Must happen before any project module reads its settings (the Celery app reads them at import).
os.environ["WAIFU_BROKER_URL"] = TEST_REDIS_URL
os.environ.setdefault("WAIFU_LOG_LEVEL", "INFO")
os.environ["WAIFU_EMBEDDED_REDIS"] = "false"
# tests train from scratch (weights=none) on small real data: no ImageNet download, same result everywhere
os.environ["WAIFU_BACKBONE_WEIGHTS"] = "none"
# pytest-xdist's workers (execnet) set COLUMNS=80 and LINES=24: a `waifu run` started from a test in a real
# terminal (tmux) would lay its screen out for those, not for the terminal it runs in
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)

from tests.support.browser import browser  # noqa: F401 - a fixture, found by name
from tests.support.fixtures import (  # noqa: F401 - fixtures are found by name
    _migrated_postgres,
    db_url,
    fake,
    labelled_db,
    redis_client,
    service_env,
    start_worker,
)
from tests.support.ordering import TimesPerTest, longest_files_first
from tests.support.processes import _processes_checked  # noqa: F401 - autouse: the `processes` marker kept true
from tests.support.testdata import ImagesUnavailable


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(TimesPerTest(), "waifu-test-times")


@pytest.hookimpl(trylast=True)  # after `-m` and `-k` deselected: the order of what runs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    longest_files_first(config, items)  # pytest-xdist's workers then finish together (tests/support/ordering.py)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A test without its real images fails with the one line that says how to provide them, no traceback."""
    outcome = yield
    if call.excinfo is not None and call.excinfo.errisinstance(ImagesUnavailable):
        outcome.get_result().longrepr = str(call.excinfo.value)
