"""The web page's test helpers: a collection of posts and faces as the pipeline leaves them (pictures drawn
here), and an HTTP client of the served application that knows its CSRF token."""

from __future__ import annotations

import io
import re

import httpx
from PIL import Image

from core.settings import get_settings
from db.engine import session_scope
from db.models import Face, FaceState, LabelSource, Post, PostCharacter
from scraper.characters import add_characters
from tests.support.drawn import drawn_image

CHARACTERS = ["nishikino_maki", "sakurauchi_riko", "takimoto_hifumi"]
BOX = (300, 200, 200, 200)  # x, y, w, h of every face in the drawn illustration (1600x1200)


def store_file(relative: str, data: bytes) -> None:
    path = get_settings().data_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def crop_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(drawn_image(seed, (96, 96)))).save(buffer, format="PNG")
    return buffer.getvalue()


def make_collection() -> dict[str, list[int]]:
    """Posts and ready faces as the pipeline leaves them: 4 ambiguous faces (two with a suggestion) on a
    post of two characters, 2 tag-labelled, 1 rejected. Returns face ids by kind."""
    add_characters(CHARACTERS)
    ids: dict[str, list[int]] = {"ambiguous": [], "tag": [], "rejected": []}
    with session_scope() as session:
        chars = {c: i + 1 for i, c in enumerate(CHARACTERS)}
        for post_id, tags in ((101, CHARACTERS[:2]), (102, CHARACTERS[:1]), (103, CHARACTERS[2:])):
            data = drawn_image(post_id, (1600, 1200) if post_id == 101 else (320, 240))
            relative = f"images/{post_id}.png"
            store_file(relative, data)
            session.add(
                Post(
                    id=post_id,
                    md5=f"{post_id:032x}",
                    file_url="https://safebooru.org//x",
                    state="done",
                    stored_path=relative,
                    tags=" ".join(tags),
                    faces=4 if post_id == 101 else 1,
                )
            )
            session.flush()
            for tag in tags:
                session.add(PostCharacter(post_id=post_id, character_id=chars[tag]))
        plan = [
            (101, "ambiguous", None, "nishikino_maki", 0.91),
            (101, "ambiguous", None, "sakurauchi_riko", 0.42),
            (101, "ambiguous", None, None, None),
            (101, "ambiguous", None, None, None),
            (102, "tag", "nishikino_maki", None, None),
            (103, "tag", "takimoto_hifumi", None, None),
            (102, "rejected", None, None, None),
        ]
        for n, (post_id, kind, label, suggestion, score) in enumerate(plan):
            relative = f"faces/{n:02d}.png"
            store_file(relative, crop_bytes(n))
            x, y, w, h = BOX
            face = Face(
                post_id=post_id,
                detector="animeface",
                x=x,
                y=y,
                w=w,
                h=h,
                crop_left=x,
                crop_top=y,
                crop_right=x + w,
                crop_bottom=y + h,
                path=relative,
                state=FaceState.rejected if kind == "rejected" else FaceState.ready,
                label=label,
                label_source=LabelSource.manual if kind == "rejected" else kind,
                split="test" if n == 4 else "train",
                suggestion=suggestion,
                suggestion_score=score,
            )
            session.add(face)
            session.flush()
            ids[kind].append(face.id)
    return ids


def face(face_id: int) -> Face:
    with session_scope() as session:
        return session.get(Face, face_id)


class Web:
    """An HTTP client of the served application that knows its CSRF token."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.client = httpx.Client(base_url=base, headers={"accept": "text/html"}, timeout=30)
        self._csrf: str | None = None

    @property
    def csrf(self) -> str:
        """The token a page of this session carries (it changes at login and logout)."""
        if self._csrf is None:
            self._csrf = page_csrf(self.client.get("/login", follow_redirects=True).text)
        return self._csrf

    def get(self, url: str, **kw) -> httpx.Response:
        return self.client.get(url, **kw)

    def post(self, url: str, data: dict | None = None, json_answer: bool = True, **kw) -> httpx.Response:
        headers = {"accept": "application/json"} if json_answer else {}
        answer = self.client.post(url, data={"csrf_token": self.csrf, **(data or {})}, headers=headers, **kw)
        if url in ("/login", "/logout"):
            self._csrf = None  # a new session, a new token
        return answer


def page_csrf(page: str) -> str:
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
    assert found, page[:500]
    return found.group(1)
