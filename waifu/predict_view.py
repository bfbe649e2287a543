"""`waifu predict`: detect faces, name each with the current model (or `unknown` when the best probability is
under the model's threshold), show the top 3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.settings import get_settings


def predict_paths(paths: list[Path], as_json: bool, annotate_dir: Path | None, console: Console) -> bool:
    from predict.classify import load_current
    from waifu.annotate_output import each_image

    settings = get_settings()
    version, classifier = load_current(settings)
    if classifier is None:  # on stderr: stdout stays JSON lines only under --json
        Console(stderr=True).print("[red]no current model yet: run `waifu retrain --force --wait` first[/red]")
        return False

    def describe(path: Path, image, detections: list, out: Path | None) -> dict:
        from detect.annotate import annotate
        from detect.detectors import Detection
        from predict.classify import classify_image

        # the detection ran bounded in a child; the naming stays here, where the model is loaded
        faces = classify_image(classifier, image, settings, detections=detections)
        size = {"width": image.width, "height": image.height}
        entry: dict[str, Any] = {"path": str(path), "model": f"v{version.id}", **size, "faces": faces}
        if out:
            boxes = [Detection.from_box(f["box"], f["detector"]) for f in faces]
            annotate(image, boxes, [_label(f) for f in faces]).save(out)
            entry["annotated"] = str(out)
        return entry

    entries = each_image(
        paths, settings, settings.detector, describe, as_json=as_json, annotate_dir=annotate_dir, kind="predicted"
    )
    results = list(entries)
    if as_json:
        return all("error" not in e for e in results)
    table = Table(title=f"predictions (model v{version.id})")
    table.add_column("image", overflow="fold")  # the whole path: a cut one does not say which file it was
    for column in ("face box", "name", "top 3"):
        table.add_column(column)
    for entry in results:
        if "error" in entry:
            table.add_row(escape(entry["path"]), "-", "-", f"[red]{escape(entry['error'])}[/red]")
        elif not entry["faces"]:
            table.add_row(escape(entry["path"]), "-", "-", "no face found")
        for face in entry["faces"]:
            top = ", ".join(f"{t['name']} {t['p']:.2f}" for t in face["top"])
            table.add_row(escape(entry["path"]), str(tuple(face["box"])), escape(_label(face)), escape(top))
    console.print(table)
    return all("error" not in e for e in results)


def _label(face: dict) -> str:
    """'name 0.93', or 'unknown (best: name 0.41 < 0.55)' under the model's threshold."""
    best = face["top"][0]
    if face.get("name") == "unknown":
        return f"unknown (best: {best['name']} {best['p']:.2f} < {face.get('threshold', 0):.2f})"
    return f"{best['name']} {best['p']:.2f}"
