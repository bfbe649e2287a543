"""The web page over real HTTP (uvicorn in a thread), on SQLite and PostgreSQL: every route, the label
actions and undo through labels.manual, images by id, login, CSRF, and every bad input answered with a 4xx
and a message. Pictures are drawn here (tests/support/drawn.py); the browser test uses real crops."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from sqlmodel import select

from core.settings import get_settings, reset_settings_cache
from db.engine import session_scope
from db.models import (
    Character,
    Face,
    FaceLabelEvent,
    FaceState,
    ModelStatus,
    ModelVersion,
    Post,
    PostState,
)
from labels.manual import label_faces, undo
from labels.priority import usefulness
from tests.support.cli import run_cli_blocking
from tests.support.env import PROJECT_ROOT
from tests.support.web import BOX, Web, face, make_collection, store_file
from train.registry import labelled_count
from waifu.web.security import StartRefused, check_bind, is_loopback
from waifu.web.server import serving_in_thread


@pytest.fixture
def web(service_env, redis_client) -> Iterator[Web]:
    with serving_in_thread(get_settings()) as base:
        client = Web(base)
        yield client
        client.client.close()


@pytest.fixture
def faces(service_env) -> dict[str, list[int]]:
    return make_collection()


def card_ids(html: str) -> list[int]:
    import re

    return [int(m) for m in re.findall(r'id="face-(\d+)"', html)]


# ----------------------------------------------------------------------------------- pages ----
def test_faces_page_filters_and_pages(web: Web, faces) -> None:
    ambiguous, tagged, rejected = faces["ambiguous"], faces["tag"], faces["rejected"]
    page = web.get("/faces")
    assert page.status_code == 200
    assert card_ids(page.text) == sorted(ambiguous + tagged)  # default: ready faces
    assert "<b>6</b> faces match" in page.text
    assert card_ids(web.get("/faces?source=ambiguous").text) == ambiguous
    assert card_ids(web.get("/faces?source=tag&split=test").text) == [tagged[0]]
    assert card_ids(web.get("/faces?state=rejected").text) == rejected
    assert card_ids(web.get("/faces?state=any").text) == sorted(ambiguous + tagged + rejected)
    assert card_ids(web.get("/faces?suggested=yes").text) == ambiguous[:2]
    assert card_ids(web.get("/faces?suggested=no&source=ambiguous").text) == ambiguous[2:]
    assert card_ids(web.get("/faces?below=0.5").text) == [ambiguous[1]]
    # character: its label or the model's suggestion
    assert card_ids(web.get("/faces?character=nishikino_maki").text) == [ambiguous[0], tagged[0]]
    assert card_ids(web.get("/faces?post=103").text) == [tagged[1]]
    # each card: crop by id, suggestion with its probability, the post's tracked tags as numbered choices
    html = web.get("/faces?source=ambiguous").text
    assert f'src="/faces/{ambiguous[0]}/crop.png"' in html and "0.91" in html
    assert 'title="label as nishikino_maki (1)"' in html and 'title="label as sakurauchi_riko (2)"' in html

    first = web.get("/faces?size=2")
    assert card_ids(first.text) == sorted(ambiguous + tagged)[:2] and 'id="previous-page"' not in first.text
    second = web.get(f"/faces?size=2&after={card_ids(first.text)[-1]}")
    assert card_ids(second.text) == sorted(ambiguous + tagged)[2:4]
    assert 'id="previous-page"' in second.text and 'id="next-page"' in second.text
    back = web.get(f"/faces?size=2&before={card_ids(second.text)[0]}")
    assert card_ids(back.text) == card_ids(first.text)


def test_faces_most_useful_first_and_its_paging(web: Web, faces) -> None:
    a0, a1, a2, a3 = faces["ambiguous"]  # post 101, tagged maki and riko
    t0, t1 = faces["tag"]  # maki (post 102, test split), hifumi (post 103)
    with session_scope() as session:
        doubtful = session.get(Face, t1)  # a tag label a model trained without it doubts: likely wrong
        doubtful.doubt, doubtful.doubt_score = "a model trained without this face calls it nishikino_maki", 0.9
        inferred = session.get(Face, a3)  # an inferred label with a low margin
        inferred.label, inferred.label_source, inferred.inferred_margin = "nishikino_maki", "inferred", 0.3
        untagged = session.get(Face, a2)  # unsure, but of a character its post is not tagged with
        untagged.suggestion, untagged.suggestion_score = "takimoto_hifumi", 0.2
    # worth (labels.priority): a3 0.7 x 20/22 (maki: t0 and a3), a1 0.58 (riko: no label), a2 0.8 x 0.25,
    # t1 1 - 0.9 (hifumi: no undoubted label), a0 0.09 x 20/22, t0 0 (a tag label nobody doubts)
    expected = [a3, a1, a2, t1, a0, t0]
    page = web.get("/faces?order=useful")
    assert page.status_code == 200
    assert card_ids(page.text) == expected
    assert card_ids(web.get("/faces").text) == sorted(expected), "the default order is still the face id"
    assert "worth 0.64" in page.text and "worth 0.58" in page.text and "worth 0.10" in page.text
    assert '<option value="useful" selected>' in page.text
    # the database computes the rule of labels.priority (the function bench/active.py measures)
    with session_scope() as session:
        rows = {f.id: f for f in session.exec(select(Face)).all()}
        tags = {101: {"nishikino_maki", "sakurauchi_riko"}, 102: {"nishikino_maki"}, 103: {"takimoto_hifumi"}}
        python = {
            i: usefulness(
                f.label_source,
                f.suggestion_score,
                f.inferred_margin,
                f.doubt_score,
                {"nishikino_maki": 2}.get(f.label if f.label_source != "ambiguous" else f.suggestion, 0),
                f.suggestion in tags[f.post_id],
            )
            for i, f in rows.items()
        }
    served = web.get("/api/faces?order=useful").json()["faces"]
    assert {card["id"]: card["usefulness"] for card in served} == pytest.approx({i: python[i] for i in expected})
    api = web.get("/api/faces?order=useful&size=2").json()  # the API pages the same order
    assert [card["id"] for card in api["faces"]] == expected[:2]
    assert api["faces"][1]["usefulness"] == pytest.approx(0.58)
    assert [card["id"] for card in web.get(api["next"]).json()["faces"]] == expected[2:4]

    def link(text: str, name: str) -> str:
        found = re.search(rf'href="([^"]+)" id="{name}"', text)
        assert found, f"no {name} link"
        return html.unescape(found.group(1))

    first = web.get("/faces?order=useful&size=2").text
    second = web.get(link(first, "next-page")).text
    third = web.get(link(second, "next-page")).text
    assert [card_ids(first), card_ids(second), card_ids(third)] == [expected[0:2], expected[2:4], expected[4:6]]
    assert 'id="next-page"' not in third and 'id="previous-page"' not in first
    assert card_ids(web.get(link(second, "previous-page")).text) == expected[0:2]
    assert card_ids(web.get("/faces?order=useful&source=ambiguous").text) == [a1, a2, a0], "filters still apply"

    # a person labels the first page: those faces drop to the end, and the next page skips nobody
    label_faces([a3, a1], "takimoto_hifumi")
    assert card_ids(web.get(link(first, "next-page")).text) == [a2, t1]
    assert card_ids(web.get("/faces?order=useful").text) == [a2, t1, a0, *sorted([a1, a3, t0])]


def test_collection_page_shows_status_and_tracks_characters(web: Web, faces) -> None:
    with session_scope() as session:
        session.add(
            Post(
                id=900,
                md5="9" * 32,
                file_url="https://safebooru.org//y",
                state=PostState.failed,
                reason="md5 mismatch: expected 0123456789abcdef0123456789abcdef",
            )
        )
    page = web.get("/collection")
    assert page.status_code == 200
    assert "md5 mismatch" in page.text  # failure reasons grouped
    assert '<td><a href="/faces?source=ambiguous">ambiguous</a></td><td class="num">4</td>' in page.text
    assert 'id="growth-chart"' in page.text
    chart = web.get("/collection/growth.png")
    assert chart.status_code == 200 and chart.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(chart.content)).size[0] > 400

    added = web.post("/collection/characters", {"tags": "Kuroki_Tomoko, aoba_suzukaze", "extra": "-comic"})
    assert added.status_code == 200 and added.json()["message"] == "added kuroki_tomoko, aoba_suzukaze"
    removed = web.post("/collection/characters/remove", {"tag": "takimoto_hifumi"})
    assert removed.status_code == 200
    page = web.get("/collection").text
    assert "kuroki_tomoko" in page and 'id="remove-takimoto_hifumi"' not in page
    # without script: back to the page with a one-time message
    plain = web.post("/collection/characters", {"tags": "yagami_kou"}, json_answer=False, follow_redirects=False)
    assert plain.status_code == 303 and plain.headers["location"] == "/collection"
    assert "added yagami_kou" in web.get("/collection").text


def test_models_page_shows_versions_and_serves_their_pictures(web: Web, faces) -> None:
    settings = get_settings()
    directory = settings.models_dir / "v1"
    directory.mkdir(parents=True)
    picture = io.BytesIO()
    Image.new("RGB", (300, 200), "white").save(picture, format="PNG")
    (directory / "training_curves.png").write_bytes(picture.getvalue())
    metrics = {"n": 6, "per_class": {"nishikino_maki": {"precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 2}}}
    with session_scope() as session:
        session.add(
            ModelVersion(
                status=ModelStatus.current,
                reason="first model",
                accuracy=0.8333,
                macro_f1=0.7,
                counts=json.dumps({"nishikino_maki": 30, "sakurauchi_riko": 30}),
                metrics=json.dumps(metrics),
                artifact_dir="models/v1",
                labelled_faces=72,
                inferred_trained=12,
                inferred_changed=3,
                loop_round=1,
            )
        )
        session.add(ModelVersion(status=ModelStatus.failed, reason="NotEnoughData: need 2 characters"))
    page = web.get("/models")
    assert page.status_code == 200
    assert "0.833" in page.text and "first model" in page.text and "NotEnoughData: need 2 characters" in page.text
    assert 'src="/models/1/training_curves.png"' in page.text
    assert 'src="/models/1/confusion_matrix.png"' not in page.text  # not written: not shown
    served = web.get("/models/1/training_curves.png")
    assert served.status_code == 200 and served.content == picture.getvalue()
    assert web.get("/models/retrain/status").json() == {"phase": "idle", "task": None}
    # the self-training loop's record of the version
    assert '<td>inferred labels trained on</td><td class="num">12</td>' in page.text
    assert '<td>inferred labels changed after it</td><td class="num">3</td>' in page.text
    assert '<td>self-training follow-up</td><td class="num">1</td>' in page.text
    # the characters as the next retrain sees them: few faces, so a warning; the current model's F1
    row = page.text.split('id="character-nishikino_maki"', 1)[1].split("</tr>", 1)[0]
    assert "0.67" in row and "collect more, or label by hand on the faces page" in row


def test_images_are_served_by_face_id(web: Web, faces) -> None:
    settings = get_settings()
    face_id = faces["ambiguous"][0]
    crop = web.get(f"/faces/{face_id}/crop.png")
    assert crop.status_code == 200 and crop.content == (settings.data_dir / face(face_id).path).read_bytes()
    source = web.get(f"/faces/{face_id}/source.png")
    assert source.status_code == 200 and source.headers["content-type"] == "image/png"
    shown = Image.open(io.BytesIO(source.content)).convert("RGB")
    assert shown.size == (1024, 768)  # 1600x1200 scaled down for the browser
    x, y, w, h = (round(v * 0.64) for v in BOX)
    assert shown.getpixel((x + w // 2, y + h)) == (255, 64, 64)  # the box, drawn in animeface's colour


# ------------------------------------------------------------------------------- actions ----
def test_label_reject_accept_bulk_and_undo_through_the_page(web: Web, faces) -> None:
    a1, a2, a3, a4 = faces["ambiguous"]
    splits = {i: face(i).split for i in faces["ambiguous"]}
    with session_scope() as session:
        before_count = labelled_count(session)

    accepted = web.post("/faces/action", {"action": "accept", "ids": str(a1)})
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["faces"] == [
        {
            "id": a1,
            "state": "ready",
            "label": "nishikino_maki",
            "label_source": "manual",
            "split": splits[a1],
            "suggestion": "nishikino_maki",
            "suggestion_score": 0.91,
        }
    ]
    labelled = web.post("/faces/action", {"action": "label", "ids": str(a2), "tag": "sakurauchi_riko"})
    assert labelled.json()["message"] == "labelled 1 face as sakurauchi_riko"
    rejected = web.post("/faces/action", {"action": "reject", "ids": str(a3)})
    assert rejected.json()["faces"][0]["state"] == "rejected"
    assert (face(a1).label, face(a2).label, face(a3).state) == ("nishikino_maki", "sakurauchi_riko", "rejected")
    with session_scope() as session:
        assert labelled_count(session) == before_count + 2  # manual labels count towards the retrain rule
    assert {i: face(i).split for i in faces["ambiguous"]} == splits  # the split never moves

    # a selection: one action, one undo
    bulk = web.post(
        "/faces/action", {"action": "label", "ids": f"{a3},{a4}", "tag": "nishikino_maki", "id": str(faces["tag"][1])}
    )
    assert bulk.json()["message"] == "labelled 3 faces as nishikino_maki"
    assert face(a3).state == FaceState.ready  # labelling a rejected face takes it back
    undone = web.post("/faces/undo")
    assert undone.status_code == 200 and undone.json()["message"] == "undone: 3 faces as before"
    assert (face(a3).state, face(a3).label_source) == ("rejected", "manual")
    assert (face(a4).label, face(a4).label_source) == (None, "ambiguous")
    assert (face(faces["tag"][1]).label, face(faces["tag"][1]).label_source) == ("takimoto_hifumi", "tag")
    web.post("/faces/undo")  # then the reject before it
    assert (face(a3).state, face(a3).label_source) == ("ready", "ambiguous")
    with session_scope() as session:
        events = session.exec(select(FaceLabelEvent).order_by(FaceLabelEvent.id)).all()
    assert [(e.face_id, e.origin, e.undone_at is not None) for e in events] == [
        (a1, "web", False),
        (a2, "web", False),
        (a3, "web", True),
        (a3, "web", True),
        (a4, "web", True),
        (faces["tag"][1], "web", True),
    ]
    # without script: a plain form goes back where it came from
    plain = web.post(
        "/faces/action",
        {"action": "reject", "ids": str(a4), "back": "/faces?source=ambiguous"},
        json_answer=False,
        follow_redirects=False,
    )
    assert plain.status_code == 303 and plain.headers["location"] == "/faces?source=ambiguous"
    assert "rejected 1 face" in web.get("/faces?source=ambiguous").text


def test_undo_keeps_what_changed_since(service_env, faces) -> None:
    a1 = faces["ambiguous"][0]
    label_faces([a1], "sakurauchi_riko")
    with session_scope() as session:  # someone else changes the label afterwards, outside the history
        session.get(Face, a1).label = "takimoto_hifumi"
    result = undo()
    assert face(a1).label == "takimoto_hifumi" and face(a1).label_source == "ambiguous"
    assert result.kept == [f"face {a1}: label changed since (takimoto_hifumi)"]
    with pytest.raises(LookupError, match="nothing to undo"):
        undo()


def test_cli_refuses_a_face_id_an_integer_column_cannot_hold(service_env) -> None:
    """Face ids are INTEGER: a larger one is a usage error on both databases (was PostgreSQL's "integer out of
    range" as a traceback; the CLI fuzz runs on SQLite only)."""
    for args in (["reject", 2**31], ["label", 2**31, "x"], ["undo", 2**31]):
        result = run_cli_blocking(service_env, "faces", *map(str, args))
        assert result.returncode == 2, (args, result.stdout, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and "2147483647" in result.stderr, (args, result.stderr[-2000:])


def test_cli_label_reject_undo_share_the_history(service_env, faces) -> None:
    a1, a2 = faces["ambiguous"][:2]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "waifu.cli", "faces", *args],
            env={**os.environ},
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    labelled = cli("label", str(a1), "sakurauchi_riko")
    assert labelled.returncode == 0 and f"face {a1}: label sakurauchi_riko (manual)" in labelled.stdout
    assert cli("reject", str(a2)).returncode == 0
    assert face(a2).state == FaceState.rejected
    only_a1 = cli("undo", str(a1))
    assert only_a1.returncode == 0 and f"face {a1}: ready, label - (ambiguous)" in only_a1.stdout
    assert face(a2).state == FaceState.rejected  # the other change stays
    assert cli("undo").returncode == 0 and face(a2).state == FaceState.ready
    nothing = cli("undo")
    assert nothing.returncode == 1 and "nothing to undo" in nothing.stderr
    with session_scope() as session:
        assert {e.origin for e in session.exec(select(FaceLabelEvent)).all()} == {"cli"}


# ------------------------------------------------------------------------------ retrain ----
def test_retrain_button_enqueues_once(web: Web, faces, redis_client) -> None:
    from train.retrain import retrain_lock

    lock = retrain_lock(timeout=60)
    assert lock.acquire(blocking=False)
    try:
        busy = web.post("/models/retrain")
        assert busy.status_code == 409 and busy.json()["message"] == "a retrain is already running"
        assert redis_client.llen("train") == 0
        assert web.get("/models/retrain/status").json()["phase"] == "running"
    finally:
        lock.release()
    started = web.post("/models/retrain")
    assert started.status_code == 200 and started.json()["message"].startswith("retrain enqueued (task ")
    [message] = [json.loads(m) for m in redis_client.lrange("train", 0, -1)]
    assert message["headers"]["task"] == "worker.tasks.retrain"
    status = web.get("/models/retrain/status").json()
    assert status["phase"] == "queued" and status["task"] == message["headers"]["id"]
    again = web.post("/models/retrain")  # no worker took it yet: a second press enqueues nothing
    assert again.status_code == 409 and "already queued" in again.json()["message"]
    assert redis_client.llen("train") == 1
    assert "queued: waiting for the train worker" in web.get("/models").text
    # the worker reports progress as the retrain task does (Celery's result backend in Redis)
    from worker.app import app

    app.backend.store_result(
        status["task"], {"phase": "scratch", "epoch": 2, "epochs": 5, "val_accuracy": 0.5}, "PROGRESS"
    )
    assert web.get("/models/retrain/status").json() == {
        "task": status["task"],
        "state": "PROGRESS",
        "phase": "running",
        "stage": "scratch",
        "epoch": 2,
        "epochs": 5,
        "val_accuracy": 0.5,
    }
    assert "running: epoch 2/5" in web.get("/models").text
    app.backend.store_result(
        status["task"], {"status": "current", "version": 3, "reason": "first model", "accuracy": 0.9}, "SUCCESS"
    )
    done = web.get("/models/retrain/status").json()
    assert (done["phase"], done["version"], done["status"]) == ("done", 3, "current")
    assert "last retrain: v3 current (first model)" in web.get("/models").text


# --------------------------------------------------------------------------- bad inputs ----
BAD_GETS = [
    ("/faces/abc/crop.png", 404, "face id must be a positive whole number"),
    ("/faces/0/source.png", 404, "face id must be a positive whole number"),
    (f"/faces/{2**70}/crop.png", 404, "face id must be a positive whole number"),
    ("/faces/999999/crop.png", 404, "no face with id 999999"),
    ("/faces/999999/source.png", 404, "no face with id 999999"),
    ("/faces?source=everything", 400, "source must be one of ambiguous, inferred, tag, manual, none"),
    ("/faces?state=detected", 400, "state must be one of ready, rejected"),
    ("/faces?split=validation", 400, "split must be one of train, test"),
    ("/faces?below=2", 400, "below must be a probability between 0 and 1"),
    ("/faces?below=abc", 400, "below must be a probability between 0 and 1"),
    ("/faces?post=-5", 400, "post must be a positive whole number"),
    (f"/faces?post={2**64}", 400, "post must be a positive whole number"),
    ("/faces?after=x1", 400, "after must be a positive whole number"),
    ("/faces?size=100000", 400, "size must be at most 500"),
    ("/faces?suggested=maybe", 400, "suggested must be one of yes, no"),
    ("/faces?order=best", 400, "order must be one of id, useful"),
    ("/faces?order=useful&after=3&at=x", 400, "at must be a number"),
    ("/models/7/training_curves.png", 404, "no model version 7"),
    ("/models/x/training_curves.png", 404, "model version must be a positive whole number"),
    ("/models/1/waifu.db", 404, "no picture 'waifu.db'; there are training_curves.png, confusion_matrix.png"),
    ("/models/1/..%2F..%2Fwaifu.db", 404, "there is no page at /models/1/../../waifu.db"),
    ("/no/such/page", 404, "there is no page at /no/such/page"),
    # Unicode digits: str.isdigit() takes them, int() does not (security review row 10: these were 500s)
    ("/faces?post=%C2%B2", 400, "post must be a positive whole number, not '²'"),
    ("/faces?size=%C2%B2", 400, "size must be a positive whole number"),
    ("/faces?after=%E2%91%A0", 400, "after must be a positive whole number, not '①'"),
    ("/faces?before=%D9%A1", 400, "before must be a positive whole number"),  # Arabic-Indic 1
    ("/faces/%C2%B2/crop.png", 404, "face id must be a positive whole number"),
    ("/faces/%C2%B2/source.png", 404, "face id must be a positive whole number"),
    ("/models/%C2%B2/training_curves.png", 404, "model version must be a positive whole number"),
    ("/faces?post=" + "0" * 30 + "1", 400, "post must be a positive whole number"),  # length bound
    # face and model version ids are INTEGER: a larger number was a 500 on PostgreSQL (found by test_web_fuzz)
    (f"/faces/{2**31}/crop.png", 404, f"face id must be a positive whole number up to {2**31 - 1}"),
    ("/faces/5067740794708055040/source.png", 404, "face id must be a positive whole number up to"),
    (f"/faces?after={2**31}", 400, "after must be a positive whole number up to"),
    (f"/faces?before={2**40}", 400, "before must be a positive whole number up to"),
    (f"/models/{2**31}/training_curves.png", 404, "model version must be a positive whole number up to"),
    (f"/faces/{2**31 - 1}/crop.png", 404, f"no face with id {2**31 - 1}"),  # the largest is an id
]


def test_bad_ids_and_values_in_urls_get_a_4xx_with_a_message(web: Web, faces) -> None:
    for url, status, message in BAD_GETS:
        for accept in ("text/html", "application/json", "image/png"):
            answer = web.get(url, headers={"accept": accept})
            assert answer.status_code == status, (url, accept, answer.text[:300])
            assert message in html.unescape(answer.text), (url, accept, answer.text[:300])


def test_bad_form_values_get_a_4xx_with_a_message(web: Web, faces) -> None:
    a1, a3 = faces["ambiguous"][0], faces["ambiguous"][2]
    cases = [
        ({"action": "explode", "ids": str(a1)}, 400, "action must be one of accept, label, reject"),
        ({"action": "reject", "ids": ""}, 400, "no face selected"),
        ({"action": "reject", "ids": "1,two"}, 400, "face id must be a positive whole number, not 'two'"),
        ({"action": "reject", "ids": str(2**80)}, 400, "face id must be a positive whole number"),
        ({"action": "reject", "ids": f"{a1},{2**31}"}, 400, "face id must be a positive whole number up to"),
        ({"action": "reject", "ids": "²"}, 400, "face id must be a positive whole number, not '²'"),
        ({"action": "reject", "ids": ",".join(map(str, range(1, 1502)))}, 400, "1501 faces selected: at most 1000"),
        ({"action": "reject", "ids": "1," * 12_000}, 400, "too many face ids"),
        ({"action": "reject", "ids": f"{a1},999999"}, 404, "no face with id 999999"),
        ({"action": "label", "ids": str(a1)}, 400, "choose a character"),
        ({"action": "label", "ids": str(a1), "tag": "someone_else"}, 404, "'someone_else' is not a tracked character"),
        ({"action": "accept", "ids": f"{a1},{a3}"}, 409, f"no suggestion for face {a3}"),
    ]
    for data, status, message in cases:
        answer = web.post("/faces/action", data)
        assert answer.status_code == status and message in answer.json()["message"], (data, answer.text[:300])
        page = web.post("/faces/action", data, json_answer=False)
        assert page.status_code == status and message in html.unescape(page.text)
    assert face(a1).label_source == "ambiguous"  # nothing was half done
    with session_scope() as session:
        assert session.exec(select(FaceLabelEvent)).all() == []
    assert web.post("/faces/undo").status_code == 409
    assert web.post("/collection/characters", {"tags": "rating:safe"}).status_code == 400
    assert web.post("/collection/characters", {"tags": " "}).status_code == 400
    # longer than the column: was a 500 on PostgreSQL ("value too long", found by test_web_fuzz)
    long_tag = web.post("/collection/characters", {"tags": "a" * 256})
    assert long_tag.status_code == 400 and "a tag is at most 255 characters, not 256" in long_tag.json()["message"]
    assert web.post("/collection/characters", {"tags": "a" * 255}).status_code == 200  # the longest is a tag
    # extra terms and ratings longer than their columns were cut short without a word; now refused or merged
    long_extra = web.post("/collection/characters", {"tags": "yagami_kou", "extra": "-comic " * 100})
    assert long_extra.status_code == 400 and "at most 500 characters" in long_extra.json()["message"]
    cut_word = web.post("/collection/characters", {"tags": "yagami_kou", "ratings": "x" * 98 + ",questionable"})
    assert cut_word.status_code == 400 and "has no rating 'xxxx" in cut_word.json()["message"]
    repeated = web.post("/collection/characters", {"tags": "yagami_kou", "ratings": "general, safe," * 20})
    assert repeated.status_code == 200, repeated.text[:300]
    with session_scope() as session:
        kou = session.exec(select(Character).where(Character.tag == "yagami_kou")).one()
        assert (kou.extra_terms, kou.ratings) == ("", "general,safe")  # the refusals changed nothing
    gone = web.post("/collection/characters/remove", {"tag": "nobody_at_all"})
    assert gone.status_code == 404
    assert gone.json()["message"] == "'nobody_at_all' is not tracked on safebooru: nothing to stop"


def test_files_outside_the_data_dir_or_missing_are_refused(web: Web, faces) -> None:
    a1, a2 = faces["ambiguous"][:2]
    with session_scope() as session:
        session.get(Face, a1).path = "../../../../etc/passwd"
        session.get(Post, 101).stored_path = None
        session.get(Face, a2).path = "faces/gone.png"
    outside = web.get(f"/faces/{a1}/crop.png")
    assert outside.status_code == 404 and "outside the data dir" in outside.text
    missing = web.get(f"/faces/{a2}/crop.png")
    assert missing.status_code == 404 and "its file is missing" in missing.text
    no_file = web.get(f"/faces/{a2}/source.png")
    assert no_file.status_code == 404 and "post 101" in no_file.text and "has no file yet" in no_file.text
    store_file("images/broken.png", b"<html>not an image</html>")
    with session_scope() as session:
        session.get(Post, 101).stored_path = "images/broken.png"
    broken = web.get(f"/faces/{a2}/source.png")
    assert broken.status_code == 422 and "not an image" in broken.text


# ------------------------------------------------------------------------------ security ----
def post_routes() -> list[str]:
    from waifu.web.app import create_app

    return sorted(
        {route.path for route in create_app(get_settings()).routes if "POST" in (getattr(route, "methods", None) or ())}
    )


def test_every_post_without_the_csrf_token_is_refused(web: Web, faces) -> None:
    routes = post_routes()
    assert {"/faces/action", "/faces/undo", "/models/retrain", "/collection/characters", "/login"} <= set(routes)
    token = web.csrf
    for path in routes:
        no_token = web.client.post(path, data={"action": "reject", "ids": str(faces["ambiguous"][0])})
        assert no_token.status_code == 403 and "CSRF token" in no_token.text, path
        wrong = web.client.post(path, data={"csrf_token": "x" * 43}, headers={"x-csrf-token": "y" * 43})
        assert wrong.status_code == 403, path
        other_site = web.client.post(
            path, data={"csrf_token": token}, headers={"origin": "https://evil.example", "x-csrf-token": token}
        )
        assert other_site.status_code == 403 and "cross-origin" in other_site.text, path
    assert face(faces["ambiguous"][0]).state == FaceState.ready
    # the header alone (the page's script) is enough; the cookie must match it
    assert (
        web.client.post("/faces/undo", headers={"x-csrf-token": token, "accept": "application/json"}).status_code == 409
    )  # accepted by the guard: nothing to undo


@pytest.fixture
def with_login(service_env, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("WAIFU_WEB_USER", "curator")
    monkeypatch.setenv("WAIFU_WEB_PASSWORD", "s3cret-pass-phrase")
    reset_settings_cache()
    yield
    reset_settings_cache()


def test_login_is_required_when_credentials_are_set(with_login, web: Web, faces) -> None:
    first = web.get("/faces?source=ambiguous", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/login?next=/faces%3Fsource%3Dambiguous"
    assert web.get(f"/faces/{faces['ambiguous'][0]}/crop.png", headers={"accept": "image/png"}).status_code == 401
    assert web.get("/models/retrain/status", headers={"accept": "application/json"}).status_code == 401
    assert web.get("/login").status_code == 200

    wrong = web.post("/login", {"username": "curator", "password": "guess", "next": "/faces"}, json_answer=False)
    assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
    assert "waifu_session" not in web.client.cookies
    escape = web.post(
        "/login",
        {"username": "curator", "password": "s3cret-pass-phrase", "next": "//evil.example/x"},
        json_answer=False,
        follow_redirects=False,
    )
    assert escape.status_code == 303 and escape.headers["location"] == "/"  # never off the site
    assert web.get("/faces").status_code == 200

    web.post("/logout", json_answer=False)
    assert web.get("/faces", follow_redirects=False).status_code == 303
    basic = base64.b64encode(b"curator:s3cret-pass-phrase").decode()
    assert web.get("/faces", headers={"authorization": f"Basic {basic}"}).status_code == 200
    bad = base64.b64encode(b"curator:nope").decode()
    assert web.get("/faces", headers={"authorization": f"Basic {bad}", "accept": "*/*"}).status_code == 401


def test_without_credentials_only_loopback_names_are_answered(web: Web) -> None:
    assert web.get("/faces", headers={"host": "localhost"}).status_code == 200
    rebound = web.get("/faces", headers={"host": "attacker.example"})
    assert rebound.status_code == 400 and "loopback" in rebound.text


def test_refuses_to_start_off_loopback_without_credentials(service_env, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    with pytest.raises(StartRefused, match="not a loopback address and no credentials"):
        check_bind("0.0.0.0", get_settings())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAIFU_WEB_")}
    refused = subprocess.run(
        [sys.executable, "-m", "waifu.cli", "web", "--host", "0.0.0.0", "--port", str(port)],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "not a loopback address and no credentials" in refused.stderr
    half = subprocess.run(
        [sys.executable, "-m", "waifu.cli", "web", "--port", str(port)],
        env={**env, "WAIFU_WEB_USER": "curator"},
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert half.returncode == 2 and "set both WAIFU_WEB_USER and WAIFU_WEB_PASSWORD" in half.stderr
    monkeypatch.setenv("WAIFU_WEB_USER", "curator")
    monkeypatch.setenv("WAIFU_WEB_PASSWORD", "s3cret-pass-phrase")
    reset_settings_cache()
    check_bind("0.0.0.0", get_settings())  # with credentials: allowed


def test_migration_0005_goes_down_and_up(service_env) -> None:
    from sqlalchemy import inspect

    from db.engine import get_engine
    from db.migrate import upgrade

    def face_indexes() -> set[str]:
        return {ix["name"] for ix in inspect(get_engine()).get_indexes("face")}

    assert {"ix_face_source_state_id", "ix_face_suggestion", "ix_face_suggestion_score"} <= face_indexes()
    from alembic import command

    from db.migrate import alembic_config

    command.downgrade(alembic_config(), "0004")
    get_engine().dispose()
    assert "face_label_event" not in inspect(get_engine()).get_table_names()
    assert "ix_face_suggestion" not in face_indexes()
    upgrade()
    get_engine().dispose()
    assert "face_label_event" in inspect(get_engine()).get_table_names()


def test_static_files_are_the_packaged_ones(web: Web) -> None:
    for name in ("faces.js", "models.js", "waifu.css"):
        served = web.get(f"/static/{name}")
        assert served.status_code == 200
        assert served.content == (Path(__file__).resolve().parents[1] / "waifu/web/static" / name).read_bytes()
    page = web.get("/faces").text
    assert "http://" not in page.split("<main>")[0] and "https://" not in page  # nothing from elsewhere
