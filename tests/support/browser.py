"""A real browser for the web page tests: Debian's chromium driven by Selenium through /usr/bin/chromedriver
(headless, its own profile in the test's tmp dir), and screenshots saved to the test's tmp dir (and to
WAIFU_TEST_SCREENSHOTS when set)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            "the browser tests need Debian's chromium and chromium-driver: apt-get install -y chromium "
            "chromium-driver (`make test` does it as root: deploy/test-services.sh)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


class Screens:
    def __init__(self, driver, folder: Path) -> None:
        self.driver, self.folder = driver, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.extra = Path(os.environ["WAIFU_TEST_SCREENSHOTS"]) if os.environ.get("WAIFU_TEST_SCREENSHOTS") else None

    def shoot(self, name: str, height: int | None = None) -> Path:
        if height:
            self.driver.set_window_size(1400, height)
        path = self.folder / f"{name}.png"
        assert self.driver.save_screenshot(str(path)), name
        if self.extra:
            self.extra.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, self.extra / path.name)
        self.driver.set_window_size(1400, 1000)
        return path
