"""Posts as the download step leaves them, and the face steps run on them in-process (detect, then crop)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image
from sqlmodel import select

from core.settings import get_settings
from crop.step import crop_face
from db.engine import session_scope
from db.models import Character, Face, Post, PostCharacter, PostState
from detect.step import detect_post
from tests.support.testdata import raw_image


def store_post(post_id: int, data: bytes, tags: list[str], suffix: str = "png") -> int:
    """A post as the download step leaves it: file stored by hash, row `downloaded`, linked to `tags`."""
    settings = get_settings()
    md5 = hashlib.md5(data).hexdigest()
    relative = Path("images") / md5[:2] / f"{md5}.{suffix}"
    (settings.data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / relative).write_bytes(data)
    with session_scope() as session:
        session.add(
            Post(
                id=post_id,
                md5=md5,
                file_url=f"https://safebooru.org//images/1/{md5}.{suffix}",
                tags=" ".join(tags),
                state=PostState.downloaded,
                stored_path=relative.as_posix(),
            )
        )
        session.flush()
        for tag in tags:
            character = session.exec(select(Character).where(Character.tag == tag)).first()
            if character:
                session.add(PostCharacter(post_id=post_id, character_id=character.id))
    return post_id


def run_pipeline(post_id: int) -> list[Face]:
    settings = get_settings()
    outcome = detect_post(post_id, settings)
    for face_id in outcome.next_ids:
        crop_face(face_id, settings)
    with session_scope() as session:
        return list(session.exec(select(Face).where(Face.post_id == post_id).order_by(Face.id)).all())


def post_row(post_id: int) -> Post:
    with session_scope() as session:
        return session.get(Post, post_id)


def side_by_side(*names: str) -> bytes:
    images = [Image.open(raw_image(n)).convert("RGB") for n in names]
    height = min(im.height for im in images)
    images = [im.resize((round(im.width * height / im.height), height)) for im in images]
    canvas = Image.new("RGB", (sum(im.width for im in images), height), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
