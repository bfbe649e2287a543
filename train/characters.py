"""The per-character report of `waifu status` and the models page: for every tracked character, the faces
available, the training and test faces a retrain would use, the current model's F1 on them, and a warning
when a character has fewer than WAIFU_MIN_TRAIN_FACES training faces."""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import Session, col, func, select

from core.settings import Settings
from db.models import Character, Face, FaceState, LabelSource
from labels.splits import split_counts
from train.registry import current_version

ADVICE = "collect more, or label by hand on the faces page"


def character_report(session: Session, settings: Settings) -> list[dict[str, Any]]:
    """One row per tracked character (and per label no longer tracked that still has faces), by name."""
    splits = split_counts(session)  # tag and manual labels, not doubtful
    available: dict[str, int] = {}
    inferred: dict[str, int] = {}
    for label, source, split, n in session.exec(
        select(Face.label, Face.label_source, Face.split, func.count())
        .where(Face.state == FaceState.ready, col(Face.label).is_not(None))
        .group_by(col(Face.label), col(Face.label_source), col(Face.split))
    ).all():
        if label is None:  # filtered out above
            continue
        available[label] = available.get(label, 0) + int(n)
        if source == LabelSource.inferred and split == "train":
            inferred[label] = inferred.get(label, 0) + int(n)
    current = current_version(session)
    per_class = json.loads(current.metrics or "{}").get("per_class", {}) if current else {}
    names = set(session.exec(select(Character.tag)).all()) | set(available)
    rows = []
    for name in sorted(names):
        train = splits.get(name, {}).get("train", 0)
        f1 = per_class.get(name, {}).get("f1")
        row = {
            "character": name,
            "available": available.get(name, 0),
            "train": train,
            "inferred": inferred.get(name, 0),
            "test": splits.get(name, {}).get("test", 0),
            "f1": None if f1 is None else round(float(f1), 3),
            "warning": "",
        }
        if train < settings.min_train_faces:
            row["warning"] = f"{train} training faces (< {settings.min_train_faces}): {ADVICE}"
        rows.append(row)
    return rows
