"""`waifu predict`: detect faces, name each with the current model, show the top 3."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console
from rich.table import Table

from waifu.settings import get_settings

WHOLE_IMAGE_MAX_SIDE = 160  # an image this small with no detection is taken to be a face crop


def load_current():  # noqa: ANN201
    from db.engine import session_scope
    from worker.retrain import current_version
    from worker.training import load_artifacts

    with session_scope() as session:
        current = current_version(session)
    if current is None or not current.artifact_dir:
        return None, None
    return current, load_artifacts(get_settings().data_dir / current.artifact_dir)


def classify_image(classifier: Any, image: Image.Image) -> list[dict[str, Any]]:
    import numpy as np

    from worker.detect import Detection, detect_faces
    from worker.imaging import crop_face, square_crop_box
    from worker.training import predict, top_k

    settings = get_settings()
    detections = detect_faces(image, settings.detector, settings)
    if not detections and max(image.size) <= WHOLE_IMAGE_MAX_SIDE:
        detections = [Detection(0, 0, image.width, image.height, "whole-image", None)]
    if not detections:
        return []
    crops = np.stack([
        np.asarray(crop_face(image, square_crop_box(d, image.size, settings.face_margin)
                             if d.detector != "whole-image" else (0, 0, image.width, image.height), size=96))
        for d in detections
    ])
    ranked = top_k(classifier, predict(classifier, crops), k=3)
    return [{"box": [d.x, d.y, d.w, d.h], "detector": d.detector,
             "top": [{"name": name, "p": round(float(p), 4)} for name, p in top]}
            for d, top in zip(detections, ranked, strict=True)]


def predict_paths(paths: list[Path], as_json: bool, annotate_dir: Path | None, console: Console) -> bool:
    from worker.detect import Detection, pin_opencv_threads
    from worker.imaging import annotate, to_rgb

    version, classifier = load_current()
    if classifier is None:
        console.print("[red]no current model yet: run `waifu retrain --force --wait` first[/red]")
        return False
    pin_opencv_threads()
    results = []
    for path in paths:
        try:
            with Image.open(path) as im:
                image = to_rgb(im)
        except Exception as exc:
            results.append({"path": str(path), "error": f"not an image: {exc}", "faces": []})
            continue
        faces = classify_image(classifier, image)
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
        return True
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
    return True
