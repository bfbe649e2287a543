"""`waifu predict`: detect faces, name each with the current model, show the top 3."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from core.settings import get_settings


def predict_paths(paths: list[Path], as_json: bool, annotate_dir: Path | None, console: Console) -> bool:
    from core.errors import Refused
    from core.images import open_image
    from detect.annotate import annotate
    from detect.detectors import Detection, pin_opencv_threads
    from predict.classify import classify_image, load_current

    settings = get_settings()
    version, classifier = load_current(settings)
    if classifier is None:
        console.print("[red]no current model yet: run `waifu retrain --force --wait` first[/red]")
        return False
    pin_opencv_threads()
    results = []
    for path in paths:
        try:
            image = open_image(path, settings.max_image_pixels)
        except Refused as exc:
            results.append({"path": str(path), "error": str(exc), "faces": []})
            continue
        faces = classify_image(classifier, image, settings)
        entry = {"path": str(path), "model": f"v{version.id}", "faces": faces}
        if annotate_dir:
            annotate_dir.mkdir(parents=True, exist_ok=True)
            boxes = [Detection(*f["box"], f["detector"]) for f in faces]
            labels = [f"{f['top'][0]['name']} {f['top'][0]['p']:.2f}" for f in faces]
            out = annotate_dir / f"{path.stem}.predicted.png"
            annotate(image, boxes, labels).save(out)
            entry["annotated"] = str(out)
        results.append(entry)
    if as_json:
        for entry in results:
            print(json.dumps(entry))
        return all("error" not in e for e in results)
    table = Table(title=f"predictions (model v{version.id})")
    for column in ("image", "face box", "top 3"):
        table.add_column(column)
    for entry in results:
        if not entry["faces"]:
            table.add_row(entry["path"], "-", entry.get("error", "no face found"))
        for face in entry["faces"]:
            top = ", ".join(f"{t['name']} {t['p']:.2f}" for t in face["top"])
            table.add_row(entry["path"], str(tuple(face["box"])), top)
    console.print(table)
    return all("error" not in e for e in results)
