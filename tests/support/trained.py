"""A collection with a trained current model, made once per test run and copied for each test module that
needs one (`waifu predict`, the web page's "who is this", `waifu model export`).

Every real crop of tests/support/testdata.py as a ready, tag-labelled face in its split, on SQLite, and one
retrain (weights=none, 10 epochs) that made v1 current. pytest-xdist's workers share it: the first to ask
trains it under a file lock while the others wait, so the run trains it once instead of once per module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

from core.settings import get_settings, reset_settings_cache
from tests.support.env import TEST_REDIS_URL

SUMMARY = "retrain-summary.json"  # the retrain's own summary, beside the data dir


def _settings_env(data_dir: Path) -> dict[str, str]:
    return {
        "WAIFU_DATA_DIR": str(data_dir),
        "WAIFU_DATABASE_URL": f"sqlite:///{data_dir / 'waifu.db'}",
        "WAIFU_BROKER_URL": TEST_REDIS_URL,
        "WAIFU_TRAIN_EPOCHS": "10",
        "WAIFU_TRAIN_THREADS": "2",
        "WAIFU_BACKBONE_WEIGHTS": "none",
        "WAIFU_WEAK_LABELS": "false",
    }


def _train(data_dir: Path) -> None:
    from db.engine import engine_for
    from db.migrate import upgrade
    from db.models import ModelStatus
    from tests.support.fixtures import add_faces
    from train.retrain import run_retrain

    env = _settings_env(data_dir)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        reset_settings_cache()
        upgrade(env["WAIFU_DATABASE_URL"])
        assert add_faces() > 100
        summary = run_retrain(get_settings())
        assert summary["status"] == ModelStatus.current, summary
        engine_for(env["WAIFU_DATABASE_URL"]).dispose()  # SQLite's write-ahead log into the file, for copying
    reset_settings_cache()
    (data_dir.parent / SUMMARY).write_text(json.dumps(summary, default=str))


def trained_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data dir of the run's trained collection (not to be written to: copy it with `copy_of`)."""
    root = tmp_path_factory.getbasetemp()
    if root.name.startswith("popen-gw"):  # a pytest-xdist worker: its parent is the run's, shared by all
        root = root.parent
    home = root / "trained-collection"
    with FileLock(f"{home}.lock"):
        if not (home / SUMMARY).exists():
            shutil.rmtree(home, ignore_errors=True)  # a build that failed half-way
            _train(home / "data")
    return home / "data"


def copy_of(collection: Path, data_dir: Path) -> tuple[dict[str, str], dict]:
    """A copy of the trained collection at `data_dir`: its settings environment and the retrain's summary."""
    shutil.copytree(collection, data_dir)
    summary = json.loads((collection.parent / SUMMARY).read_text())
    return _settings_env(data_dir), summary
