"""The rules that give a crop its label and its split, and that infer labels from a model's scores: pure
functions, no database.

A labelled face's split is stratified by character (`split_for_labelled`): no test face before the character
has `min_train` training faces, then about `test_fraction` of its faces in test. A split, once given, is
stored and never computed again; only labels.splits may move a face from test to train (never the reverse)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from db.models import LabelSource, Split

if TYPE_CHECKING:
    from numpy.typing import ArrayLike


def split_for(sha256: str, test_fraction: float) -> Split:
    """A stable function of the crop's hash: adding data or retraining never moves a face."""
    bucket = int(sha256[:12], 16) / float(1 << 48)
    return Split.test if bucket < test_fraction else Split.train


def allowed_test_faces(faces: int, test_fraction: float, min_train: int) -> int:
    """How many of a character's `faces` (labelled) may be test faces: about `test_fraction` of them, and
    never so many that fewer than `min_train` are left for training."""
    return max(0, min(int(test_fraction * faces + 0.5), faces - min_train))


def split_for_labelled(train: int, test: int, test_fraction: float, min_train: int) -> Split:
    """The split of a new labelled face of a character that has `train` and `test` faces already."""
    return Split.test if test + 1 <= allowed_test_faces(train + test + 1, test_fraction, min_train) else Split.train


def label_for(tracked_tags: list[str], faces_in_post: int) -> tuple[str | None, LabelSource]:
    """`tag` only when the post names exactly one tracked character and holds exactly one face."""
    if len(tracked_tags) == 1 and faces_in_post == 1:
        return tracked_tags[0], LabelSource.tag
    return None, LabelSource.ambiguous


def inferred_pairs(scores: ArrayLike, min_margin: float, min_score: float = 0.0) -> list[tuple[int, int, float]]:
    """Which face shows which of a post's tracked characters, from a model's scores (faces x characters,
    probabilities): every character is in the post at least once, each face is at most one of them.

    The best assignment (most total score; scipy's Hungarian method) is taken; for each of its pairs
    (face, character) the margin is the total score lost by the best assignment without that pair. A pair
    is kept when its margin is at least `min_margin` and the face's own score for the character at least
    `min_score` (the margin alone cannot see a character whose face was missed: the assignment then forces
    it onto someone else's face). One character: the margin is the best face's score minus the runner-up's.
    Returns (face index, character index, margin), by face. Nothing when the post has fewer
    than two faces (no runner-up to compare with) or fewer faces than characters (someone was missed)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError("scores must be a faces x characters matrix")
    faces, characters = matrix.shape
    if characters == 0 or faces < 2 or faces < characters:
        return []

    def best(m: np.ndarray) -> tuple[float, list[tuple[int, int]]]:
        rows, cols = linear_sum_assignment(m, maximize=True)
        return float(m[rows, cols].sum()), list(zip(rows.tolist(), cols.tolist(), strict=True))

    total, pairs = best(matrix)
    forbidden = -(abs(matrix).sum() + 1.0) * 4  # worse than any full assignment: never chosen while avoidable
    kept = []
    for face, character in pairs:
        without = matrix.copy()
        without[face, character] = forbidden
        margin = total - best(without)[0]
        if margin >= min_margin and matrix[face, character] >= min_score:
            kept.append((face, character, margin))
    return sorted(kept)
