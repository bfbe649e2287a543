"""The web page as a person uses it, in a real browser (Debian's chromium, driven by Selenium through
/usr/bin/chromedriver): log in, retrain with a real train worker and see it run and the new version appear,
sort ambiguous faces of real illustrations with the keyboard and a selection, undo, and check the database.

Screenshots of each page are saved to the test's tmp dir (and to WAIFU_TEST_SCREENSHOTS when set)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import select

from core.settings import get_settings, reset_settings_cache
from db.engine import session_scope
from db.models import Face, FaceLabelEvent, FaceState, LabelSource, ModelStatus, ModelVersion
from scraper.characters import add_characters
from tests.support.browser import Screens
from tests.support.pipeline import run_pipeline, side_by_side, store_post
from tests.support.testdata import raw_names
from waifu.web.server import serving_in_thread

pytestmark = pytest.mark.processes

USER, PASSWORD = "curator", "correct horse battery"
WAIT = 30


def faces_of(posts: list[int]) -> list[Face]:
    with session_scope() as session:
        return list(session.exec(select(Face).where(Face.post_id.in_(posts)).order_by(Face.id)).all())


@pytest.fixture
def collection(labelled_db: list[str], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The 108 real crops (tag-labelled, trainable) plus posts made of real illustrations through the real
    detect and crop steps, each tagged with two tracked characters: every face found there is ambiguous."""
    monkeypatch.setenv("WAIFU_WEB_USER", USER)
    monkeypatch.setenv("WAIFU_WEB_PASSWORD", PASSWORD)
    monkeypatch.setenv("WAIFU_TRAIN_EPOCHS", "3")
    reset_settings_cache()
    add_characters(labelled_db)
    by_tag: dict[str, list[str]] = {}
    for name in raw_names():
        by_tag.setdefault(name.split("/")[1], []).append(name.split("/", 1)[1])
    maki, riko, hifumi = (by_tag[t] for t in labelled_db)
    posts = []
    for post_id, pair in enumerate([(maki[1], riko[1]), (riko[2], hifumi[1]), (maki[2], hifumi[2])], start=1001):
        posts.append(store_post(post_id, side_by_side(*pair), [pair[0].split("/")[0], pair[1].split("/")[0]]))
        run_pipeline(post_id)
    ambiguous = [f for f in faces_of(posts) if f.state == FaceState.ready]
    assert len(ambiguous) >= 6 and all(f.label_source == LabelSource.ambiguous for f in ambiguous)
    return posts


# one browser run, on SQLite (the default a person starts with); tests/test_web.py covers every route on both
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_person_sorts_faces_and_retrains(collection: list[int], browser, start_worker, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    wait = WebDriverWait(driver, WAIT)
    screens = Screens(driver, tmp_path / "screenshots")
    # weak labels off: the retrain would otherwise infer labels for the ambiguous faces this person sorts
    # (test_weak_labels.py covers inference and how the page shows it)
    start_worker(
        queues="train",
        concurrency=1,
        pool="solo",
        extra_env={"WAIFU_TRAIN_EPOCHS": "3", "WAIFU_TRAIN_THREADS": "2", "WAIFU_WEAK_LABELS": "false"},
    )

    def flash_says(text: str) -> None:
        wait.until(ec.text_to_be_present_in_element((By.ID, "flash"), text))

    def focused_id() -> int:
        return int(driver.switch_to.active_element.get_attribute("data-id"))

    def press(key: str) -> None:
        driver.switch_to.active_element.send_keys(key)

    with serving_in_thread(get_settings()) as base:
        # --- log in: a wrong password is refused, the right one opens the page asked for ---------------
        driver.get(f"{base}/models")
        assert driver.current_url.startswith(f"{base}/login?next=/models")
        driver.find_element(By.ID, "username").send_keys(USER)
        driver.find_element(By.ID, "password").send_keys("wrong password")
        driver.find_element(By.ID, "login-submit").click()
        # the click returns before the answer loads when the machine is busy: wait for the refusal
        refusal = wait.until(ec.visibility_of_element_located((By.ID, "login-error")))
        assert refusal.text == "wrong user name or password"
        driver.find_element(By.ID, "username").send_keys(USER)
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login-submit").click()
        wait.until(ec.url_to_be(f"{base}/models"))
        assert driver.find_element(By.ID, "no-models").is_displayed()

        # a POST without the CSRF token is refused, even from the page itself with its session cookie
        status = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch('/faces/undo', {method: 'POST', headers: {'Accept': 'application/json'}})
              .then((r) => r.text().then((t) => done([r.status, t])));""")
        assert status == [403, "missing or wrong CSRF token: reload the page and try again"]

        # --- retrain: "running" with the epoch, then the new version on the page ------------------------
        driver.find_element(By.ID, "retrain").click()
        flash_says("retrain enqueued")
        driver.find_element(By.ID, "retrain").click()  # a second press while it waits or runs
        flash_says("a retrain is already")
        WebDriverWait(driver, 300).until(ec.text_to_be_present_in_element((By.ID, "retrain-status"), "running"))
        WebDriverWait(driver, 600).until(ec.presence_of_element_located((By.ID, "version-1")))
        version = driver.find_element(By.ID, "version-1")
        assert "current" in version.text and "first model" in version.text
        with session_scope() as session:
            [v1] = session.exec(select(ModelVersion)).all()
        assert v1.status == ModelStatus.current
        assert f"{v1.accuracy:.3f}" in version.text
        wait.until(
            lambda d: all(
                img.get_attribute("naturalWidth") not in (None, "0")
                for img in d.find_elements(By.CSS_SELECTOR, "#version-1 img.chart")
            )
        )
        assert len(driver.find_elements(By.CSS_SELECTOR, "#version-1 img.chart")) == 2
        screens.shoot("web-models", 800)

        # the promotion enqueued `classify`: the worker attaches suggestions to the ambiguous faces
        def suggested() -> bool:
            return all(f.suggestion for f in faces_of(collection) if f.state == FaceState.ready)

        WebDriverWait(driver, 300, poll_frequency=1).until(lambda _d: suggested())

        # --- faces: filter the ambiguous ones ----------------------------------------------------------
        driver.get(f"{base}/faces")
        Select(driver.find_element(By.ID, "filter-source")).select_by_value("ambiguous")
        driver.find_element(By.ID, "filter-apply").click()
        wait.until(ec.url_contains("source=ambiguous"))
        cards = driver.find_elements(By.CSS_SELECTOR, "article.face")
        ambiguous = [f for f in faces_of(collection) if f.state == FaceState.ready]
        assert [int(c.get_attribute("data-id")) for c in cards] == [f.id for f in ambiguous]
        wait.until(
            lambda d: all(
                img.get_attribute("naturalWidth") == "96"
                for img in d.find_elements(By.CSS_SELECTOR, "article.face img")
            )
        )
        screens.shoot("web-faces", 1000)

        # the illustration with the face boxed, on demand (o)
        first = ambiguous[0]
        assert focused_id() == first.id
        press("o")
        wait.until(
            lambda d: (
                d.find_element(By.CSS_SELECTOR, "#source-view img").get_attribute("naturalWidth") not in (None, "0")
            )
        )
        screens.shoot("web-faces-source")
        driver.find_element(By.CSS_SELECTOR, "#source-view button.close").click()

        # --- one at a time with the keyboard: Enter accepts, a digit picks, x rejects ---------------------
        driver.execute_script(f"document.getElementById('face-{first.id}').focus()")
        press(Keys.ENTER)
        flash_says("accepted the suggestion for 1 face")
        with session_scope() as session:
            now = session.get(Face, first.id)
        assert (now.label, now.label_source) == (first.suggestion, LabelSource.manual)
        assert focused_id() == ambiguous[1].id  # the focus moved on

        second = ambiguous[1]
        second_choice = driver.find_element(By.ID, f"face-{second.id}").get_attribute("data-choices")
        press("2")
        flash_says("labelled 1 face as")
        with session_scope() as session:
            now = session.get(Face, second.id)
        assert (now.label, now.label_source) == (json.loads(second_choice)[1], LabelSource.manual)

        third = ambiguous[2]
        assert focused_id() == third.id
        press("x")
        flash_says("rejected 1 face")
        with session_scope() as session:
            assert session.get(Face, third.id).state == FaceState.rejected
        assert "rejected" in driver.find_element(By.ID, f"face-{third.id}").text
        # the focus moved on again; arrows move it too
        assert focused_id() == ambiguous[3].id
        press(Keys.ARROW_LEFT)
        assert focused_id() == third.id
        press(Keys.ARROW_RIGHT)
        assert focused_id() == ambiguous[3].id

        # --- a selection of three, labelled at once, then undone as one ----------------------------------
        picked = ambiguous[3:6]
        for f in picked:
            driver.find_element(By.CSS_SELECTOR, f"#face-{f.id} input.select").click()
        assert driver.find_element(By.ID, "selected-count").text == "3 selected"
        Select(driver.find_element(By.ID, "bulk-tag")).select_by_value("takimoto_hifumi")
        driver.find_element(By.ID, "bulk-label").click()
        flash_says("labelled 3 faces as takimoto_hifumi")
        with session_scope() as session:
            rows = [session.get(Face, f.id) for f in picked]
            assert [(r.label, r.label_source) for r in rows] == [("takimoto_hifumi", LabelSource.manual)] * 3
        screens.shoot("web-faces-after")

        driver.execute_script(f"document.getElementById('face-{picked[0].id}').focus()")
        press("u")
        flash_says("undone: 3 faces as before")
        with session_scope() as session:
            rows = [session.get(Face, f.id) for f in picked]
            assert [(r.label, r.label_source) for r in rows] == [(None, LabelSource.ambiguous)] * 3
            assert session.get(Face, third.id).state == FaceState.rejected  # the earlier changes stay
            events = session.exec(select(FaceLabelEvent)).all()
        assert len(events) == 6 and {e.origin for e in events} == {"web"}
        assert sum(e.undone_at is not None for e in events) == 3

        # --- the collection page ----------------------------------------------------------------------
        driver.get(f"{base}/collection")
        wait.until(lambda d: d.find_element(By.ID, "growth-chart").get_attribute("naturalWidth") not in (None, "0"))
        assert "takimoto_hifumi" in driver.find_element(By.ID, "per-character").text
        screens.shoot("web-collection", 1250)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_person_orders_the_faces_most_useful_first(labelled_db: list[str], browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    with session_scope() as session:  # the last three real crops: ambiguous, the model less and less sure
        faces = list(session.exec(select(Face).order_by(Face.id)).all())
        for face, score in zip(faces[-3:], (0.9, 0.6, 0.3), strict=True):
            face.suggestion, face.suggestion_score = face.label, score
            face.label, face.label_source = None, LabelSource.ambiguous
        unsure = [f.id for f in faces[-3:]][::-1]
    driver = browser
    with serving_in_thread(get_settings()) as base:
        driver.get(f"{base}/faces")

        def grid() -> list[int]:
            return [int(e.get_attribute("data-id")) for e in driver.find_elements(By.CSS_SELECTOR, "#grid .face")]

        assert grid()[:3] == [f.id for f in faces[:3]], "face id order first"
        Select(driver.find_element(By.ID, "filter-order")).select_by_value("useful")
        driver.find_element(By.ID, "filter-apply").click()
        WebDriverWait(driver, WAIT).until(ec.url_contains("order=useful"))
        assert grid()[:3] == unsure, "the face the model is least sure of first"
        assert "worth " in driver.find_element(By.ID, f"face-{unsure[0]}").text
        chosen = Select(driver.find_element(By.ID, "filter-order")).first_selected_option
        assert chosen.get_attribute("value") == "useful"
        Screens(driver, tmp_path / "screenshots").shoot("faces-most-useful-first")
