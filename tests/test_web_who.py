"""Issue 20's "Who is this?" page and POST /api/predict with a real model: trained here (few epochs,
weights=none) on the real crops of `resized_for_training`, asked about the illustrations the crops of
`resized_for_test` were cut from (pictures it never saw). The answers must be those of predict/ (what
`waifu predict` says), the model loaded once per process, a pasted address fetched with the download
code's checks and nothing left on disk, an overrun answered "busy"; and a person does it in a real
browser (the screenshot is docs/web-who.png)."""

from __future__ import annotations

import asyncio
import io
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from core.images import open_image
from core.settings import get_settings, reset_settings_cache
from tests.support.browser import Screens
from tests.support.fake_safebooru import FakeSafebooru, publish
from tests.support.testdata import raw_image
from tests.support.trained import copy_of, trained_collection
from tests.support.web import Web
from waifu.web.app import create_app
from waifu.web.naming import Busy, Namer
from waifu.web.server import serving_in_thread

pytestmark = pytest.mark.processes

USER, PASSWORD = "curator", "correct horse battery"
TOKEN = "script-token-0123456789abcdef"
# character -> an illustration of the test split whose face the detectors find (tests/test_cli_images.py)
ILLUSTRATIONS = {
    "sakurauchi_riko": "sakurauchi_riko/31.jpg",
    "nishikino_maki": "nishikino_maki/31.jpg",
    "takimoto_hifumi": "takimoto_hifumi/35.jpg",
}


@pytest.fixture(scope="module")
def model_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A copy of the run's trained collection (tests/support/trained.py: v1 current, trained on the real crops'
    train split, SQLite), a login and an API token."""
    env, _summary = copy_of(trained_collection(tmp_path_factory), tmp_path_factory.mktemp("who") / "data")
    env |= {
        "WAIFU_DETECTOR": "both",
        "WAIFU_WEB_USER": USER,
        "WAIFU_WEB_PASSWORD": PASSWORD,
        "WAIFU_WEB_API_TOKEN": TOKEN,
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        reset_settings_cache()
        yield env
    reset_settings_cache()


def api_predict(client: httpx.Client, path: Path, **params) -> httpx.Response:
    files = {"picture": (path.name, path.read_bytes(), "image/jpeg")}
    return client.post("/api/predict", files=files, params=params, headers={"authorization": f"Bearer {TOKEN}"})


def largest(faces: list[dict]) -> dict:
    return max(faces, key=lambda f: f["box"][2] * f["box"][3])


def test_api_answers_as_waifu_predict_and_loads_the_model_once(model_env) -> None:
    from predict.classify import classify_image, load_current

    settings = get_settings()
    version, classifier = load_current(settings)
    app = create_app(settings)
    with serving_in_thread(settings, app=app) as base, httpx.Client(base_url=base, timeout=120) as client:
        for character, name in ILLUSTRATIONS.items():
            path = raw_image(name)
            answer = api_predict(client, path)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            image = open_image(path)
            assert (body["ok"], body["model"], body["width"], body["height"]) == (
                True,
                f"v{version.id}",
                image.width,
                image.height,
            )
            # the very answer of predict/ (the code behind `waifu predict`) on the same picture
            expected = classify_image(classifier, image, settings)
            assert [(f["box"], f["name"]) for f in body["faces"]] == [(f["box"], f["name"]) for f in expected]
            for got, want in zip(body["faces"], expected, strict=True):
                assert [t["name"] for t in got["top"]] == [t["name"] for t in want["top"]]
                assert [t["p"] for t in got["top"]] == pytest.approx([t["p"] for t in want["top"]], abs=1e-3)
            best = largest(body["faces"])
            assert best["top"][0]["name"] == character, (name, best)
            assert len(best["top"]) == 3 and best["top"][0]["p"] >= best["top"][1]["p"] >= best["top"][2]["p"]
            assert best["name"] in (character, "unknown") and 0 < best["threshold"] < 1
        one = api_predict(client, raw_image(ILLUSTRATIONS["nishikino_maki"]), k=1).json()
        assert all(len(f["top"]) == 1 for f in one["faces"])
    assert app.state.namer.loads == 1  # four predictions, one model load


def test_the_page_shows_the_picture_boxed_and_each_faces_names(model_env) -> None:
    with serving_in_thread(get_settings()) as base:
        web = Web(base)
        assert web.post("/login", {"username": USER, "password": PASSWORD}, json_answer=False).status_code == 303
        form = web.get("/who")
        assert form.status_code == 200 and 'enctype="multipart/form-data"' in form.text
        path = raw_image(ILLUSTRATIONS["takimoto_hifumi"])
        page = web.client.post(
            "/who", files={"picture": ("hifumi.jpg", path.read_bytes(), "image/jpeg")}, data={"csrf_token": web.csrf}
        )
        assert page.status_code == 200, page.text[-2000:]
        assert 'id="who-model">named by model v1<' in page.text
        rows = re.findall(r'<tr class="who-face" id="who-face-(\d+)" data-name="([^"]+)">', page.text)
        assert rows and "takimoto_hifumi" in page.text
        tops = re.findall(r'<span class="who-top-name">([^<]+)</span> <span class="num">(\d+) %</span>', page.text)
        assert len(tops) == 3 * len(rows)
        picture_url = re.search(r'<img src="(/who/pictures/[^"]+\.jpg)"', page.text).group(1)
        picture = web.get(picture_url)
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
        shown = Image.open(io.BytesIO(picture.content))
        original = open_image(path)
        assert max(shown.size) == min(720, max(original.size))  # scaled for the browser
        # a file that is not an image: refused with a sentence, on the page
        refused = web.client.post(
            "/who", files={"picture": ("notes.jpg", b"just some text", "image/jpeg")}, data={"csrf_token": web.csrf}
        )
        assert refused.status_code == 422
        assert "this file cannot be named: not an image" in refused.text and 'id="error-detail"' in refused.text
        # a picture kept no longer, or never: 404 with a sentence
        gone = web.get("/who/pictures/no-such-key.jpg", headers={"accept": "application/json"})
        assert gone.status_code == 404 and "no longer kept" in gone.json()["message"]


async def test_a_pasted_address_is_fetched_with_the_download_checks(model_env, monkeypatch, redis_client) -> None:
    fake = FakeSafebooru()
    await fake.start()
    try:
        data = raw_image(ILLUSTRATIONS["nishikino_maki"]).read_bytes()
        [post] = publish(fake, {"nishikino_maki": [(data, ".jpg")]})
        monkeypatch.setenv("WAIFU_DEFAULT_SITE_URL", fake.base_url)
        reset_settings_cache()
        scratch = Path(tempfile.mkdtemp(prefix="who-tmp-"))
        monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the fetched file goes for a moment
        url = fake._file_url(post)

        def ask(value: str) -> httpx.Response:
            with serving_in_thread(get_settings()) as base, httpx.Client(base_url=base, timeout=120) as client:
                return client.post(
                    "/api/predict", files={"url": (None, value)}, headers={"authorization": f"Bearer {TOKEN}"}
                )

        answer = await asyncio.to_thread(ask, url)
        assert answer.status_code == 200, answer.text
        assert largest(answer.json()["faces"])["top"][0]["name"] == "nishikino_maki"
        assert [r.path for r in fake.file_requests()][-1].endswith(post.image)
        # a redirect off the allow-list is refused as a download's is
        post.fault = "redirect_offsite"
        refused = await asyncio.to_thread(ask, url)
        assert refused.status_code == 422 and "redirect to disallowed host" in refused.json()["message"]
        # a file gone from the site
        post.fault = "404"
        gone = await asyncio.to_thread(ask, url)
        assert gone.status_code == 422 and "HTTP 404" in gone.json()["message"]
        assert list(scratch.iterdir()) == []  # the temporary file is gone with its directory
        shutil.rmtree(scratch)
    finally:
        await fake.stop()
        reset_settings_cache()


def test_a_prediction_over_its_time_limit_answers_busy(model_env) -> None:
    settings = get_settings()
    data = raw_image(ILLUSTRATIONS["sakurauchi_riko"]).read_bytes()
    hurried = Namer(settings, timeout=0.001)  # detection alone takes far longer than a millisecond
    with pytest.raises(Busy, match="took longer than 0 s"):
        hurried.name(data)
    hurried.close()
    app = create_app(settings)
    app.state.namer = Namer(settings, timeout=0.001)
    with serving_in_thread(settings, app=app) as base, httpx.Client(base_url=base, timeout=120) as client:
        answer = api_predict(client, raw_image(ILLUSTRATIONS["sakurauchi_riko"]))
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert "WAIFU_WEB_PREDICT_TIMEOUT_S" in answer.json()["message"]
    # the same picture with time enough
    assert Namer(settings).name(data).faces


def test_a_person_asks_who_is_this_in_the_browser(model_env, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver, wait = browser, WebDriverWait(browser, 120)
    screens = Screens(driver, tmp_path / "screenshots")
    with serving_in_thread(get_settings()) as base:
        driver.get(f"{base}/who")
        driver.find_element(By.ID, "username").send_keys(USER)
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login-submit").click()
        wait.until(ec.url_to_be(f"{base}/who"))
        # a file that is not an image first: a clear refusal on the page
        notes = tmp_path / "notes.jpg"
        notes.write_text("these are notes, not a picture")
        driver.find_element(By.ID, "who-picture").send_keys(str(notes))
        driver.find_element(By.ID, "who-submit").click()
        error = wait.until(ec.presence_of_element_located((By.ID, "error-detail")))
        assert error.text.startswith("this file cannot be named: not an image")
        # then a real illustration
        driver.find_element(By.ID, "who-picture").send_keys(str(raw_image(ILLUSTRATIONS["sakurauchi_riko"])))
        driver.find_element(By.ID, "who-submit").click()
        result = wait.until(ec.presence_of_element_located((By.ID, "who-result")))
        assert result.get_attribute("data-model") == "v1"
        assert driver.find_element(By.ID, "who-model").text == "named by model v1"
        wait.until(
            lambda d: d.find_element(By.ID, "who-picture-boxed").get_attribute("naturalWidth") not in (None, "0")
        )
        rows = driver.find_elements(By.CSS_SELECTOR, "tr.who-face")
        assert rows
        names = [r.find_elements(By.CSS_SELECTOR, ".who-top-name") for r in rows]
        assert all(len(n) == 3 for n in names)
        assert "sakurauchi_riko" in {n[0].text for n in names}
        screens.shoot("web-who", 900)  # docs/web-who.png: WAIFU_TEST_SCREENSHOTS=docs


def test_a_detection_that_never_returns_is_ended_and_refused_with_a_sentence(model_env, monkeypatch) -> None:
    """Third-party C code can hang: the web page detects in a child it kills at WAIFU_IMAGE_TIME_LIMIT_S, so a
    stuck picture gets a refusal and the next picture is named as usual."""
    monkeypatch.setenv("WAIFU_IMAGE_TIME_LIMIT_S", "5")
    monkeypatch.setenv("WAIFU_TEST_STALL_FILE", "upload")  # detect.bounded's hook: this detection never returns
    reset_settings_cache()
    settings = get_settings()
    app = create_app(settings)
    with serving_in_thread(settings, app=app) as base, httpx.Client(base_url=base, timeout=120) as client:
        answer = api_predict(client, raw_image(ILLUSTRATIONS["sakurauchi_riko"]))
        assert answer.status_code == 422, answer.text
        assert "face detection did not finish within 5 s" in answer.json()["message"], answer.text
        monkeypatch.delenv("WAIFU_TEST_STALL_FILE")
        reset_settings_cache()
        app.state.namer.settings = get_settings()  # the hook off: the same server names the next picture
        answer = api_predict(client, raw_image(ILLUSTRATIONS["sakurauchi_riko"]))
        assert answer.status_code == 200 and answer.json()["faces"], answer.text
    reset_settings_cache()
