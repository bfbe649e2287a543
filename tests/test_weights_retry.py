"""ImageNet weights that cannot be had are tried once: the failure is remembered in the process and on disk
(beside the Keras cache) for WAIFU_WEIGHTS_RETRY_S, so a retrain offline never spends time trying twice.
The download goes to a real local HTTP server that answers 503 and counts the requests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.settings import get_settings, reset_settings_cache
from train.model import TrainConfig
from train.model.backbones import forget_failures, obtain_weights
from train.retrain import train_config


class Unavailable(BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def weights_host() -> Iterator[str]:
    Unavailable.hits = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    forget_failures()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    forget_failures()


def test_a_failed_download_is_not_tried_again(weights_host: str, tmp_path: Path) -> None:
    config = TrainConfig(weights="imagenet", cache_dir=str(tmp_path), weights_url=weights_host)
    path, note = obtain_weights(config)
    assert path is None and "unavailable" in note and Unavailable.hits == 1

    path, note = obtain_weights(config)  # same process: remembered
    assert path is None and "not tried again" in note and Unavailable.hits == 1

    forget_failures()  # as a new worker process: the marker beside the cache still says so
    path, note = obtain_weights(config)
    assert path is None and "not tried again" in note and Unavailable.hits == 1

    forget_failures()
    path, _ = obtain_weights(TrainConfig(weights="imagenet", cache_dir=str(tmp_path), weights_url=weights_host,
                                         weights_retry_s=0))  # fmt: skip
    assert path is None and Unavailable.hits == 2  # the memory expired: one new attempt


def test_the_retrain_config_carries_the_retry_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WAIFU_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("WAIFU_WEIGHTS_RETRY_S", "123")
    reset_settings_cache()
    try:
        assert train_config(get_settings()).weights_retry_s == 123.0
    finally:
        monkeypatch.undo()
        reset_settings_cache()
