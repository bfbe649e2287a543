"""`waifu detect`: run the face detector on local files and show the result to a person.
Imports neither Celery nor database code: it works with no broker and no database configured."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import track
from rich.table import Table

if TYPE_CHECKING:
    from core.settings import Settings


def detect_paths(
    paths: list[Path], as_json: bool, annotate_dir: Path | None, detector: str, console: Console, settings: Settings
) -> list[dict]:
    """One entry per path; a path that cannot be read, or whose detection overruns WAIFU_IMAGE_TIME_LIMIT_S,
    gets an `error` and the others go on."""
    from waifu.annotate_output import each_image

    progress = track(paths, description="detecting", console=console, disable=as_json or len(paths) < 3)
    entries = each_image(
        progress, settings, detector, _entry, as_json=as_json, annotate_dir=annotate_dir, kind="annotated"
    )
    results = list(entries)
    if as_json:
        return results
    table = Table(title=f"faces found ({detector})")
    table.add_column("image", overflow="fold")  # the whole path: a cut one does not say which file it was
    for column in ("faces", "boxes (x, y, w, h) detector score"):
        table.add_column(column)
    for entry in results:
        boxes = "\n".join(f"{tuple(f['box'])} {f['detector']} {f['score']}" for f in entry["faces"])
        table.add_row(
            escape(entry["path"]),
            str(len(entry["faces"])) if "error" not in entry else "-",
            f"[red]{escape(entry['error'])}[/red]" if "error" in entry else boxes,
        )
    console.print(table)
    return results


def _entry(path: Path, image, detections: list, out: Path | None) -> dict:
    from detect.annotate import annotate

    faces = [
        {
            "box": [d.x, d.y, d.w, d.h],
            "detector": d.detector,
            "score": None if d.score is None else round(float(d.score), 4),
        }
        for d in detections
    ]
    entry = {"path": str(path), "width": image.width, "height": image.height, "faces": faces}
    if out:
        annotate(image, detections).save(out)
        entry["annotated"] = str(out)
    return entry
