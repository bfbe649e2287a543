"""The rules that give a crop its label and its split: pure functions, no database."""

from __future__ import annotations

from db.models import LabelSource, Split


def split_for(sha256: str, test_fraction: float) -> Split:
    """A stable function of the crop's hash: adding data or retraining never moves a face."""
    bucket = int(sha256[:12], 16) / float(1 << 48)
    return Split.test if bucket < test_fraction else Split.train


def label_for(tracked_tags: list[str], faces_in_post: int) -> tuple[str | None, LabelSource]:
    """`tag` only when the post names exactly one tracked character and holds exactly one face."""
    if len(tracked_tags) == 1 and faces_in_post == 1:
        return tracked_tags[0], LabelSource.tag
    return None, LabelSource.ambiguous
