"""Images the pages show, found by database id only: a request never names a file. Every path comes from
a row and must stay inside the data dir."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from pathlib import Path

from sqlmodel import Session

from core.images import open_image
from core.settings import Settings
from db.models import Face, ModelVersion, Post
from waifu.web.picture_cache import PictureCache
from waifu.web.versions import MODEL_PICTURES

SOURCE_MAX_SIDE = 1024  # the illustration is scaled down for the browser


class NotFound(LookupError):
    """No such row, or its file is missing; the message says which."""


def inside_data_dir(settings: Settings, relative: str | None, what: str) -> Path:
    """The file a row names, refused if it is missing or would lie outside the data dir."""
    if not relative:
        raise NotFound(f"{what} has no file yet")
    root = settings.data_dir.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise NotFound(f"{what}: its file is outside the data dir")
    if not path.is_file():
        raise NotFound(f"{what}: its file is missing")
    return path


def crop_path(session: Session, settings: Settings, face_id: int) -> Path:
    face = session.get(Face, face_id)
    if face is None:
        raise NotFound(f"no face with id {face_id}")
    return inside_data_dir(settings, face.path, f"face {face_id}")


# the pictures a page shows more than once: an illustration is decoded and boxed once per face and version
# of its file, the growth chart once a minute at most
SOURCES = PictureCache(max_bytes=64 * 1024 * 1024)
GROWTH = PictureCache(max_bytes=8 * 1024 * 1024, ttl=60.0, parallel=1)


def source_png(session: Session, settings: Settings, face_id: int) -> Callable[[], bytes]:
    """The post's illustration with this face boxed and named, at most SOURCE_MAX_SIDE pixels a side, as a
    function to call once the session is closed: only the rows are read inside it, the decoding (once, see
    SOURCES) happens after it."""
    face = session.get(Face, face_id)
    if face is None:
        raise NotFound(f"no face with id {face_id}")
    post = session.get(Post, face.post_id)
    path = inside_data_dir(settings, post.stored_path if post else None, f"post {face.post_id} of face {face_id}")
    name = face.label or (f"{face.suggestion}?" if face.suggestion else f"face {face.id}")
    box = (face.x, face.y, face.w, face.h, face.detector)
    stat = path.stat()
    key = (face_id, str(path), stat.st_mtime_ns, stat.st_size, name, box)
    return lambda: SOURCES.get(key, lambda: _draw_source(path, box, name, settings.max_image_pixels))


def _draw_source(path: Path, box: tuple, name: str, max_pixels: int) -> bytes:
    from detect.annotate import annotate
    from detect.detectors import Detection

    image = open_image(path, max_pixels)
    scale = min(1.0, SOURCE_MAX_SIDE / max(image.size))
    if scale < 1.0:  # scale first: the box and its text stay readable at the size the browser shows
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    x, y, w, h, detector = box
    shown = Detection(round(x * scale), round(y * scale), round(w * scale), round(h * scale), detector)
    buffer = io.BytesIO()
    annotate(image, [shown], [name]).save(buffer, format="PNG")
    return buffer.getvalue()


def model_picture(session: Session, settings: Settings, version_id: int, name: str) -> Path:
    if name not in MODEL_PICTURES:
        raise NotFound(f"no picture {name[:40]!r}; there are {', '.join(MODEL_PICTURES)}")
    version = session.get(ModelVersion, version_id)
    if version is None:
        raise NotFound(f"no model version {version_id}")
    if not version.artifact_dir:
        raise NotFound(f"model v{version_id} has no artifacts ({version.status})")
    return inside_data_dir(settings, f"{version.artifact_dir}/{name}", f"model v{version_id} {name}")


def growth_chart(settings: Settings) -> bytes:
    """Faces per character over time, drawn by train.charts.growth_png (matplotlib), at most once a minute."""

    def draw() -> bytes:
        from train.charts import growth_png
        from train.report import growth_series

        with tempfile.TemporaryDirectory() as tmp:
            return growth_png(growth_series(settings), Path(tmp) / "growth.png").read_bytes()

    return GROWTH.get(str(settings.resolved_database_url), draw)
