"""Rows as the pipeline's steps leave them, for tests that start in the middle of the pipeline."""

from __future__ import annotations

from db.models import Face, FaceState


def ready_face(post_id: int, path: str, split: str, label: str | None, source: str) -> Face:
    """A ready face whose 96x96 crop is the whole file at `path` (relative to the data dir): what the crop
    step leaves behind, for tests that start from faces rather than from illustrations."""
    return Face(
        post_id=post_id,
        detector="animeface",
        x=0,
        y=0,
        w=96,
        h=96,
        crop_left=0,
        crop_top=0,
        crop_right=96,
        crop_bottom=96,
        state=FaceState.ready,
        path=path,
        split=split,
        label=label,
        label_source=source,
    )
