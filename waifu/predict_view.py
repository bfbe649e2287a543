"""`waifu predict`: detect faces, name each with the current model (or `unknown` when the best probability is
under the model's threshold), show the top 3."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.settings import get_settings


def predict_paths(paths: list[Path], as_json: bool, annotate_dir: Path | None, console: Console) -> bool:
    from core.errors import Refused
    from core.images import open_image
    from detect.annotate import annotate
    from detect.bounded import BoundedDetector, DetectionFailed
    from detect.detectors import Detection
    from predict.classify import classify_image, load_current
    from waifu.annotate_output import output_path, prepare

    settings = get_settings()
    version, classifier = load_current(settings)
    if classifier is None:  # on stderr: stdout stays JSON lines only under --json
        Console(stderr=True).print("[red]no current model yet: run `waifu retrain --force --wait` first[/red]")
        return False
    results = []
    written: set[str] = set()
    if annotate_dir:
        prepare(annotate_dir)

    def done(entry: dict) -> None:
        results.append(entry)
        if as_json:  # a line per file as soon as it is known: a long batch shows progress to a pipe
            print(json.dumps(entry), flush=True)

    with BoundedDetector(settings) as bounded:
        for path in paths:
            try:
                image = open_image(path, settings.max_image_pixels)
                # the detection, bounded in a child; the naming stays here, where the model is loaded
                detections = bounded.find(image, settings.detector, str(path))
            except (Refused, DetectionFailed) as exc:
                done({"path": str(path), "error": str(exc), "faces": []})
                continue
            faces = classify_image(classifier, image, settings, detections=detections)
            entry = {
                "path": str(path),
                "model": f"v{version.id}",
                "width": image.width,
                "height": image.height,
                "faces": faces,
            }
            if annotate_dir:
                boxes = [Detection(*f["box"], f["detector"]) for f in faces]
                labels = [_label(f) for f in faces]
                out = output_path(annotate_dir, path, "predicted", written)
                annotate(image, boxes, labels).save(out)
                entry["annotated"] = str(out)
            done(entry)
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
