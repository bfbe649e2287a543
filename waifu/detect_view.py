"""`waifu detect`: run the face detector on local files and show the result to a person.
Imports neither Celery nor database code: it works with no broker and no database configured."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import track
from rich.table import Table


def detect_paths(
    paths: list[Path], as_json: bool, annotate_dir: Path | None, detector: str, console: Console, max_pixels: int
) -> list[dict]:
    """One entry per path; a path that cannot be read, or whose detection overruns WAIFU_IMAGE_TIME_LIMIT_S,
    gets an `error` and the others go on."""
    from core.errors import Refused
    from core.images import open_image
    from core.settings import get_settings
    from detect.bounded import BoundedDetector, DetectionFailed
    from waifu.annotate_output import prepare

    results = []
    written: set[str] = set()
    if annotate_dir:
        prepare(annotate_dir)

    def done(entry: dict) -> None:
        results.append(entry)
        if as_json:  # a line per file as soon as it is known: a long batch shows progress to a pipe
            print(json.dumps(entry), flush=True)

    with BoundedDetector(get_settings()) as bounded:
        for path in track(paths, description="detecting", console=console, disable=as_json or len(paths) < 3):
            try:
                image = open_image(path, max_pixels)
                detections = bounded.find(image, detector, str(path))
            except (Refused, DetectionFailed) as exc:
                done({"path": str(path), "error": str(exc), "faces": []})
                continue
            done(_entry(path, image, detections, annotate_dir, written))
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


def _entry(path: Path, image, detections: list, annotate_dir: Path | None, written: set[str]) -> dict:
    from detect.annotate import annotate
    from waifu.annotate_output import output_path

    faces = [
        {
            "box": [d.x, d.y, d.w, d.h],
            "detector": d.detector,
            "score": None if d.score is None else round(float(d.score), 4),
        }
        for d in detections
    ]
    entry = {"path": str(path), "width": image.width, "height": image.height, "faces": faces}
    if annotate_dir:
        out = output_path(annotate_dir, path, "annotated", written)
        annotate(image, detections).save(out)
        entry["annotated"] = str(out)
    return entry
