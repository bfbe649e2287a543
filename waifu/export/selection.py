"""Which faces a dataset export takes, and what it says about each: the filters and one read-only query.

No TensorFlow, no file copying here: `waifu.export.dataset` writes what this module selects.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from db.models import Face, FaceState, LabelSource, Post, pk

# what an export takes unless asked otherwise: labels from the post's tag, by hand, or inferred by the model
DEFAULT_SOURCES = frozenset({LabelSource.tag.value, LabelSource.manual.value, LabelSource.inferred.value})
# left out unless asked for: tag labels a model doubts (labels.weak), faces a person rejected
OPT_IN_SOURCES = frozenset({"doubtful", "rejected"})
KNOWN_SOURCES = DEFAULT_SOURCES | OPT_IN_SOURCES
REJECTED_CLASS = "_rejected"  # a rejected face has no character: its folder in an imagefolder export


@dataclass(frozen=True)
class ExportFilter:
    characters: frozenset[str] = frozenset()  # empty: every character
    sources: frozenset[str] = DEFAULT_SOURCES
    # a label the model gave (inferred) is kept only when the model's probability for it is at least this;
    # tag and manual labels carry no probability and always pass
    min_probability: float | None = None
    since: datetime | None = None  # the face was collected at or after this (UTC)
    until: datetime | None = None  # ... and before this

    def __post_init__(self) -> None:
        unknown = set(self.sources) - KNOWN_SOURCES
        if unknown:
            raise ValueError(f"unknown label source(s) {sorted(unknown)}; known: {sorted(KNOWN_SOURCES)}")
        if not self.sources:
            raise ValueError("no label source selected")
        if self.min_probability is not None and not 0.0 <= self.min_probability <= 1.0:
            raise ValueError(f"minimum probability {self.min_probability} is not between 0 and 1")
        if self.since and self.until and self.since >= self.until:
            raise ValueError("the date range is empty: --since must come before --until")

    def describe(self) -> dict[str, Any]:
        return {
            "characters": sorted(self.characters),
            "sources": sorted(self.sources),
            "min_probability": self.min_probability,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
        }


@dataclass
class FaceRecord:
    """One exported face: where its crop is in the data dir, and the metadata the export writes."""

    face_id: int
    source_path: str  # relative to the data dir
    character: str  # the label, or REJECTED_CLASS
    split: str
    content_key: str  # what identifies the crop's bytes (its sha256, else the path): unchanged -> not copied
    metadata: dict[str, Any] = field(default_factory=dict)


def probability_of(face: Face) -> float | None:
    """The model's probability for the face's own label, where the model recorded one."""
    if face.suggestion_score is not None and face.suggestion == face.label:
        return float(face.suggestion_score)
    return None


def _source_of(face: Face) -> str:
    if face.state == FaceState.rejected:
        return "rejected"
    if face.label_source == LabelSource.tag and face.doubt_score is not None:
        return "doubtful"
    return str(face.label_source)


def _kept(face: Face, source: str, flt: ExportFilter) -> bool:
    if source not in flt.sources:
        return False
    if source != "rejected" and not face.label:
        return False
    if flt.characters and face.label not in flt.characters:
        return False
    if flt.min_probability is not None and source == LabelSource.inferred:
        p = probability_of(face)
        return p is not None and p >= flt.min_probability
    return True


def select_faces(session: Session, flt: ExportFilter) -> list[FaceRecord]:
    """Every ready (or, if asked, rejected) face with a crop that the filter keeps, oldest first."""
    states = [FaceState.ready] + ([FaceState.rejected] if "rejected" in flt.sources else [])
    query = (
        select(Face, Post)
        .join(Post, col(Post.id) == Face.post_id)
        .where(col(Face.state).in_(states), col(Face.path).is_not(None), col(Face.split).is_not(None))
        .order_by(col(Face.id))
    )
    if flt.characters and "rejected" not in flt.sources:
        query = query.where(col(Face.label).in_(sorted(flt.characters)))
    if flt.since is not None:
        query = query.where(Face.created_at >= flt.since)
    if flt.until is not None:
        query = query.where(Face.created_at < flt.until)
    out = []
    for face, post in session.exec(query).all():
        source = _source_of(face)
        if _kept(face, source, flt):
            out.append(_record(face, post, source))
    return out


def _record(face: Face, post: Post, source: str) -> FaceRecord:
    character = face.label if source != "rejected" else REJECTED_CLASS
    metadata = {
        "face_id": face.id,
        "character": face.label,
        "label_source": source,
        "split": face.split,
        "site": post.site,
        "post_id": post.remote_id,  # the site's own id (None for a post no site listed)
        "md5": post.md5,  # of the illustration the face was cut from
        "box": [face.x, face.y, face.w, face.h],  # the detection, in the illustration's pixels
        "crop_box": [face.crop_left, face.crop_top, face.crop_right, face.crop_bottom],
        "detector": face.detector,
        "detector_score": face.score,
        "phash": face.phash,
        "sha256": face.sha256,
        "probability": probability_of(face),
        "doubt": face.doubt,
        "collected_at": face.created_at.isoformat() if face.created_at else None,
    }
    return FaceRecord(
        face_id=pk(face),
        source_path=str(face.path),
        character=str(character),
        split=str(face.split),
        content_key=face.sha256 or f"path:{face.path}",
        metadata=metadata,
    )


def counts(records: Iterable[FaceRecord]) -> dict[str, dict[str, int]]:
    """Faces per split and character, as `waifu status` counts them."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        per = out.setdefault(r.split, {})
        per[r.character] = per.get(r.character, 0) + 1
    return {split: dict(sorted(per.items())) for split, per in sorted(out.items())}
