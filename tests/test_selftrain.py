"""The self-training loop (train.selftrain, worker.tasks): the follow-up rule, and the loop on a real train
worker (real Celery, Redis and database) with holoen-faces, where the truth is known: wrong inferred labels
injected before the first retrain are trained on once, then fall out; each version records how many
inferred labels it trained on and how many changed after it; the chain stops by itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlmodel import select

from core.settings import Settings, get_settings, reset_settings_cache
from db.engine import session_scope
from db.models import Character, Face, LabelSource, ModelVersion, Post, PostCharacter
from scraper.characters import add_characters
from tests.support.fixtures import short_training
from tests.support.rows import ready_face
from train.selftrain import follow_up, inferred_change

# four characters that do not look alike (hair colours), from the 20 of holoen-faces
CHARACTERS = ["ame", "gura", "ina", "calli"]


def test_follow_up_rule() -> None:
    settings = Settings(selftrain_max_rounds=2, selftrain_min_change=0.05, weak_labels=True)
    moved = {"inferred": 90, "new": 5, "relabelled": 3, "reverted": 10}  # 18 of 100 (before or after)
    assert inferred_change(moved) == (18, 0.18)
    assert follow_up({"inferred": moved}, 0, settings)[0]
    assert follow_up({"inferred": moved}, 1, settings)[0]
    go, why = follow_up({"inferred": moved}, 2, settings)  # K follow-ups in a row already
    assert not go and "2 follow-ups in a row" in why
    calm = {"inferred": 100, "new": 2, "relabelled": 1, "reverted": 1}  # 4 of 101
    go, why = follow_up({"inferred": calm}, 0, settings)
    assert not go and why.startswith("steady")
    assert not follow_up({"inferred": {"reason": "no current model"}}, 0, settings)[0]
    assert not follow_up({"inferred": moved}, 0, Settings(weak_labels=False))[0]


def holoen() -> Path:
    root = Path(os.environ.get("WAIFU_TEST_DATA", "")) / "holoen-faces"
    if not (root / "train").is_dir():
        pytest.skip("holoen-faces not under WAIFU_TEST_DATA")
    return root


def images(split: str, tag: str) -> list[Path]:
    return sorted((holoen() / split / tag).iterdir())


def build_collection() -> dict[int, str]:
    """20 tag train faces and 6 tag test faces per character, 16 posts of two characters (two faces each),
    the faces of 10 of them given the wrong inferred label (each the other character of its post). Returns
    the true label of every face of the two-character posts; the wrong ones are those labelled now."""
    settings = get_settings()
    add_characters(CHARACTERS)
    truth: dict[int, str] = {}
    post_id = 0
    with session_scope() as session:
        ids = {c.tag: c.id for c in session.exec(select(Character)).all()}

        def post(tags: list[str], files: list[Path], split: str, labels: list[str | None], source: str) -> list[int]:
            nonlocal post_id
            post_id += 1
            session.add(Post(id=post_id, md5=f"{post_id:032x}", file_url="https://safebooru.org//x", state="done"))
            session.flush()
            for tag in tags:
                session.add(PostCharacter(post_id=post_id, character_id=ids[tag]))
            made = []
            for i, (path, label) in enumerate(zip(files, labels, strict=True)):
                relative = f"faces/{post_id}-{i}{path.suffix}"
                (settings.data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                (settings.data_dir / relative).write_bytes(path.read_bytes())
                face = ready_face(post_id, relative, split, label, source)
                session.add(face)
                session.flush()
                made.append(face.id)
            return made

        spare = {}
        for tag in CHARACTERS:
            train = images("train", tag)
            for path in train[:20]:
                post([tag], [path], "train", [tag], LabelSource.tag)
            for path in images("test", tag)[:6]:
                post([tag], [path], "test", [tag], LabelSource.tag)
            spare[tag] = train[20:]
        for n in range(16):
            a, b = CHARACTERS[n % 4], CHARACTERS[(n + 1 + n // 4) % 4]
            if a == b:
                b = CHARACTERS[(n + 2) % 4]
            files = [spare[a][n], spare[b][n]]
            wrong = n < 10
            labels = [b, a] if wrong else [None, None]
            made = post([a, b], files, "train", labels, LabelSource.inferred if wrong else LabelSource.ambiguous)
            truth.update(zip(made, [a, b], strict=True))
    return truth


@pytest.mark.processes
def test_the_loop_drops_injected_wrong_labels_and_stops(service_env, monkeypatch, start_worker) -> None:
    short_training(monkeypatch)
    loop = {"WAIFU_TRAIN_EPOCHS": "3", "WAIFU_SELFTRAIN_MAX_ROUNDS": "2", "WAIFU_SELFTRAIN_MIN_CHANGE": "0.05"}
    for key, value in loop.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    truth = build_collection()
    with session_scope() as session:
        injected = {f.id: f.label for f in session.exec(select(Face).where(Face.label_source == "inferred")).all()}
    assert len(injected) == 20 and all(truth[i] != label for i, label in injected.items())

    from worker.app import app
    from worker.retrain_request import request_retrain

    start_worker(queues="train", concurrency=1, pool="solo", extra_env=loop)
    task = request_retrain(force=True).task_id
    summaries = []
    while task:  # follow the chain the worker schedules by itself
        summary = app.AsyncResult(task).get(timeout=600)
        summaries.append(summary)
        task = summary["follow_up"].get("task")
    with session_scope() as session:
        versions = list(session.exec(select(ModelVersion).order_by(ModelVersion.id)).all())
        now = {f.id: (f.label, f.label_source) for f in session.exec(select(Face)).all() if f.id in truth}

    # the first retrain trained on the 20 wrong labels, its inference pass changed them: a follow-up
    assert versions[0].inferred_trained == 20 and versions[0].loop_round == 0
    assert versions[0].inferred_changed >= 20 and summaries[0]["follow_up"]["scheduled"]
    # bounded: at most 2 follow-ups, each recorded with its round; the last says why the chain stopped
    assert 2 <= len(versions) <= 3 and [v.loop_round for v in versions] == list(range(len(versions)))
    assert all(v.inferred_trained is not None and v.inferred_changed is not None for v in versions)
    assert versions[1].inferred_trained == summaries[0]["inferred"]["inferred"]
    assert not summaries[-1]["follow_up"]["scheduled"]
    # promotion judged every version on today's test split of tag labels only: 24 faces
    assert all(s["test_faces"] == 24 for s in summaries)
    # the injected wrong labels fell out: every such face is now unlabelled or labelled right
    kept_wrong = [i for i, label in injected.items() if now[i][0] == label]
    assert kept_wrong == []
    inferred = [label == truth[i] for i, (label, source) in now.items() if source == LabelSource.inferred]
    assert len(inferred) >= 5 and sum(inferred) >= 0.9 * len(inferred), now  # and what it labels, it labels right
