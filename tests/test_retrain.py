"""Retraining from the database on the real face crops of tests/testdata.py (weights=none, few epochs):
registry, promotion, lock, beat rule, and `waifu predict` with the promoted model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from sqlmodel import select

from core.settings import get_settings, reset_settings_cache
from db.engine import session_scope
from db.models import Face, FaceState, LabelSource, ModelStatus, ModelVersion, Post
from tests.conftest import PROJECT_ROOT
from tests.testdata import IMAGE_SUFFIXES, crop_counts, crop_dirs, raw_image
from train.step import NotEnoughData, RetrainBusy, retrain_lock, run_retrain, should_retrain
from worker.tasks import _retrain_outcome

TRAIN_COUNTS, TEST_COUNTS = crop_counts()  # from the registry: 30 and 6 per character
N_TRAIN, N_TEST = sum(TRAIN_COUNTS.values()), sum(TEST_COUNTS.values())
pytestmark = pytest.mark.slow


@pytest.fixture
def labelled_db(service_env, monkeypatch: pytest.MonkeyPatch, redis_client) -> list[str]:
    """The real 96x96 crops as ready, tag-labelled faces: resized_for_training -> train, _test -> test."""
    monkeypatch.setenv("WAIFU_TRAIN_EPOCHS", "10")
    monkeypatch.setenv("WAIFU_TRAIN_THREADS", "2")
    reset_settings_cache()
    settings = get_settings()
    post_id = 0
    with session_scope() as session:
        for folder, split in zip(crop_dirs(), ("train", "test"), strict=True):
            for tag_dir in sorted(folder.iterdir()):
                for path in sorted(tag_dir.iterdir()):
                    if path.suffix.lower() not in IMAGE_SUFFIXES:
                        continue  # e.g. a download under way in the shared cache
                    post_id += 1
                    relative = f"faces/{split}/{tag_dir.name}/{path.name}"
                    (settings.data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, settings.data_dir / relative)
                    session.add(Post(id=post_id, md5=f"{post_id:032x}", file_url="https://safebooru.org//x",
                                     state="done", faces=1))
                    session.flush()
                    session.add(Face(post_id=post_id, detector="animeface", x=0, y=0, w=96, h=96, crop_left=0,
                                     crop_top=0, crop_right=96, crop_bottom=96, state=FaceState.ready,
                                     path=relative, label=tag_dir.name, label_source=LabelSource.tag, split=split))
    return sorted(TRAIN_COUNTS)


def versions() -> list[ModelVersion]:
    with session_scope() as session:
        return list(session.exec(select(ModelVersion).order_by(ModelVersion.id)).all())


def test_retrain_registers_promotes_the_better_version_and_predicts(labelled_db: list[str], tmp_path) -> None:
    settings = get_settings()
    first = run_retrain(settings)
    assert first["status"] == ModelStatus.current and first["reason"] == "first model"
    assert first["accuracy"] > 1 / 3 + 0.2, first  # clearly above chance on 18 test faces
    assert first["test_faces"] == N_TEST and first["train_faces"] == N_TRAIN
    [v1] = versions()
    assert v1.status == ModelStatus.current and v1.duration_s > 0 and v1.code_version
    assert json.loads(v1.counts) == TRAIN_COUNTS
    assert json.loads(v1.hyperparameters)["weights"] == "none"
    artifacts = settings.data_dir / v1.artifact_dir
    for name in ("model.json", "labels.json", "metrics.json", "training_curves.png", "confusion_matrix.png"):
        assert (artifacts / name).stat().st_size > 0, name
    assert json.loads((artifacts / "metrics.json").read_text())["n"] == N_TEST

    # a much weaker design (CNN alone, one epoch) is evaluated on the same split in the same run: not promoted
    weak = run_retrain(settings, overrides={"epochs": 1, "classical_weight": 0.0, "fine_tune_epochs": 0})
    assert weak["accuracy"] < first["accuracy"], (weak, first)
    assert weak["status"] == ModelStatus.candidate
    assert weak["current_accuracy"] == pytest.approx(first["accuracy"])
    assert weak["reason"].startswith(f"did not beat current v{v1.id}")
    assert [v.status for v in versions()] == [ModelStatus.current, ModelStatus.candidate]

    # `waifu predict` on a raw illustration names a face with one of the model's characters
    result = subprocess.run([sys.executable, "-m", "waifu.cli", "predict", "--json", "--annotate", str(tmp_path),
                             str(raw_image("nishikino_maki/1.png"))], env={**os.environ}, cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["model"] == f"v{v1.id}" and answer["faces"]
    top = answer["faces"][0]["top"]
    assert len(top) == 3 and top[0]["name"] in labelled_db and top[0]["p"] >= top[1]["p"]
    assert (tmp_path / "1.predicted.png").exists()


def test_a_second_retrain_is_refused_while_one_runs(labelled_db) -> None:
    lock = retrain_lock(timeout=60)
    assert lock.acquire(blocking=False)
    try:
        with pytest.raises(RetrainBusy, match="already running"):
            run_retrain(get_settings())
        assert _retrain_outcome(force=True) == {"status": "busy", "reason": "a retrain is already running"}
        cli = subprocess.run([sys.executable, "-m", "waifu.cli", "retrain"], env={**os.environ}, cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 1 and "already running" in cli.stdout
    finally:
        lock.release()
    assert versions() == []


def test_beat_rule_skips_when_too_few_new_faces(labelled_db, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAIFU_RETRAIN_MIN_NEW_FACES", "500")
    reset_settings_cache()
    go, why = should_retrain(get_settings())
    assert not go and f"only {N_TRAIN + N_TEST} new labelled faces" in why
    assert _retrain_outcome(force=False)["status"] == "skipped"
    assert versions() == []
    monkeypatch.setenv("WAIFU_RETRAIN_MIN_NEW_FACES", "100")
    reset_settings_cache()
    assert should_retrain(get_settings())[0]


def test_one_character_is_not_enough(service_env, redis_client) -> None:
    with pytest.raises(NotEnoughData, match="need 2 characters"):
        run_retrain(get_settings())


def test_retrain_task_through_a_real_train_worker(labelled_db, start_worker) -> None:
    """`waifu retrain --force --wait`: the task runs on a solo-pool train worker and the CLI prints metrics."""
    start_worker(queues="train", concurrency=1, pool="solo",
                 extra_env={"WAIFU_TRAIN_EPOCHS": "5", "WAIFU_TRAIN_THREADS": "2"})
    cli = subprocess.run([sys.executable, "-m", "waifu.cli", "retrain", "--force", "--wait", "--timeout", "600"],
                         env={**os.environ}, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=700)
    assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-2000:]
    assert "model v1: current (first model)" in cli.stdout
    assert "macro-F1" in cli.stdout
    assert [v.status for v in versions()] == [ModelStatus.current]


def test_suggestions_for_ambiguous_faces_and_the_report(labelled_db, tmp_path) -> None:
    from train.report import write_report
    from train.step import suggest_for_ambiguous

    settings = get_settings()
    with session_scope() as session:  # two test faces become ambiguous (e.g. a post with two characters)
        ambiguous = session.exec(select(Face).where(Face.split == "test").order_by(Face.id).limit(2)).all()
        ids = [f.id for f in ambiguous]
        for face in ambiguous:
            face.label, face.label_source = None, LabelSource.ambiguous
    assert suggest_for_ambiguous(settings) == 0, "no model yet: nothing to suggest"
    run_retrain(settings)
    assert suggest_for_ambiguous(settings) == 2
    with session_scope() as session:
        for face in (session.get(Face, i) for i in ids):
            assert face.suggestion in labelled_db and 0 < face.suggestion_score <= 1
            assert face.label is None and face.label_source == LabelSource.ambiguous  # never a label

    page = write_report(settings, tmp_path / "report")
    text = page.read_text()
    assert "Current model <b>v1</b>" in text
    for name in ("training_curves.png", "confusion_matrix.png", "test_predictions.png", "faces_over_time.png"):
        assert (tmp_path / "report" / name).stat().st_size > 5000, name
        assert name in text
