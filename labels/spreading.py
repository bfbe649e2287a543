"""Label spreading over a similarity graph of faces, held to each post's tags: pure functions, arrays in and
labels out (the caller extracts the faces' features and reads the posts).

A face's k nearest neighbours (cosine, on standardised features reduced by PCA) form a graph; the labelled
faces (seeds) spread their characters over it (Zhou et al. 2004, "Learning with local and global
consistency": F <- alpha S F + (1 - alpha) Y with S the symmetrically normalised affinity). Each open post
then gives its faces only the characters it is tagged with, each character to at most one face, by the
same assignment and margin as the model's inferred labels (labels.rules.inferred_pairs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from labels.rules import inferred_pairs

# chosen with bench/spreading.py on holoen-faces (docs/model.md, "Label spreading")
SPREAD_NEIGHBOURS = 10
SPREAD_ALPHA = 0.9
SPREAD_DIMS = 64
SPREAD_MIN_MARGIN = 0.3
SPREAD_MIN_SCORE = 0.3


@dataclass(frozen=True)
class SpreadConfig:
    neighbours: int = SPREAD_NEIGHBOURS
    alpha: float = SPREAD_ALPHA  # how far labels travel: 0 keeps only the seeds, near 1 follows the graph
    dims: int = SPREAD_DIMS  # PCA components of the standardised features (0: all)
    iterations: int = 40
    min_margin: float = SPREAD_MIN_MARGIN
    min_score: float = SPREAD_MIN_SCORE


def embed(features: np.ndarray, dims: int) -> np.ndarray:
    """Standardised, PCA-reduced (when dims > 0 and smaller), unit-length rows."""
    x = np.asarray(features, dtype=np.float32)
    x = x - x.mean(0)
    scale = x.std(0)
    x /= np.where(scale > 1e-8, scale, 1.0)
    if 0 < dims < min(x.shape):
        from sklearn.utils.extmath import randomized_svd

        u, s, _ = randomized_svd(x, dims, random_state=0)
        x = u * s
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def knn_affinity(unit: np.ndarray, neighbours: int):
    """Symmetric sparse affinity: each row's `neighbours` most similar rows, weight = cosine similarity
    (clipped at a small positive floor), the larger of the two directions."""
    from scipy import sparse
    from sklearn.neighbors import NearestNeighbors

    n = len(unit)
    k = min(neighbours, n - 1)
    if k < 1:
        return sparse.csr_matrix((n, n))
    distances, index = NearestNeighbors(n_neighbors=k + 1, metric="euclidean").fit(unit).kneighbors(unit)
    rows = np.repeat(np.arange(n), k)
    cols = index[:, 1:].ravel()
    similarity = np.clip(1.0 - distances[:, 1:].ravel() ** 2 / 2.0, 1e-3, None)  # unit vectors: cos = 1 - d²/2
    w = sparse.csr_matrix((similarity, (rows, cols)), shape=(n, n))
    return w.maximum(w.T).tocsr()


def spread(features: np.ndarray, seeds: np.ndarray, num_classes: int, config: SpreadConfig | None = None) -> np.ndarray:
    """Per face, a distribution over the classes (rows sum to 1; a face no seed reaches gets zeros).
    `seeds[i]` is face i's class index, or -1 for a face to label."""
    from scipy import sparse

    config = config or SpreadConfig()
    seeds = np.asarray(seeds)
    if len(seeds) != len(features):
        raise ValueError("one seed entry per face (-1 for an open face)")
    n = len(seeds)
    y = np.zeros((n, num_classes))
    known = seeds >= 0
    y[np.flatnonzero(known), seeds[known]] = 1.0
    if n == 0 or not known.any():
        return y
    w = knn_affinity(embed(features, config.dims), config.neighbours)
    degree = np.asarray(w.sum(1)).ravel()
    inv = 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0))
    s = sparse.diags(inv) @ w @ sparse.diags(inv)
    f = y.copy()
    for _ in range(config.iterations):
        f = config.alpha * (s @ f) + (1 - config.alpha) * y
    total = f.sum(1, keepdims=True)
    return np.where(total > 0, f / np.where(total > 0, total, 1.0), 0.0)


def post_labels(
    distribution: np.ndarray,
    posts: Sequence[tuple[Sequence[int], Sequence[int]]],
    min_margin: float,
    min_score: float,
) -> list[list[tuple[int, int, float]]]:
    """Per post (open face indices, the classes of its tracked characters still to place): the pairs
    (face index, class, margin) the post's assignment keeps, as labels.rules.inferred_pairs on the spread
    distribution restricted to the post's characters."""
    out: list[list[tuple[int, int, float]]] = []
    for faces, classes in posts:
        faces, classes = list(faces), list(classes)
        if not faces or not classes:
            out.append([])
            continue
        scores = distribution[np.ix_(faces, classes)]
        out.append([(faces[f], classes[c], m) for f, c, m in inferred_pairs(scores, min_margin, min_score)])
    return out


def spread_with_posts(
    features: np.ndarray,
    seeds: np.ndarray,
    num_classes: int,
    posts: Sequence[tuple[Sequence[int], Sequence[int]]],
    prior: np.ndarray | None = None,
    config: SpreadConfig | None = None,
    rounds: int = 2,
    sure_margin: float = 0.6,
) -> np.ndarray:
    """Scores per face (faces x classes) for the posts' assignment: the spread distribution, averaged with
    `prior` (a model's probabilities for the same faces) when given. With `rounds` > 1 the faces a post's
    assignment places with at least `sure_margin` join the seeds and the labels spread again: a face
    settled by its own post's tags helps its look-alikes in other posts."""
    config = config or SpreadConfig()
    current = np.asarray(seeds).copy()
    scores = np.zeros((len(current), num_classes))
    for round_ in range(max(1, rounds)):
        distribution = spread(features, current, num_classes, config)
        scores = distribution if prior is None else (distribution + prior) / 2
        if round_ == rounds - 1:
            break
        placed: dict[int, int] = {}
        clash: set[int] = set()
        for pairs in post_labels(scores, posts, sure_margin, config.min_score):
            for face, cls, _ in pairs:
                if placed.get(face, cls) != cls:
                    clash.add(face)
                placed[face] = cls
        for face, cls in placed.items():
            if face not in clash and current[face] < 0:
                current[face] = cls
    return scores


def spread_labels(
    features: np.ndarray,
    seeds: np.ndarray,
    num_classes: int,
    posts: Sequence[tuple[Sequence[int], Sequence[int]]],
    config: SpreadConfig | None = None,
) -> dict[int, tuple[int, float]]:
    """Face index -> (class, margin) for the open faces spreading labels with confidence; a face two posts
    disagree about gets nothing."""
    config = config or SpreadConfig()
    distribution = spread(features, seeds, num_classes, config)
    decided: dict[int, tuple[int, float]] = {}
    conflicted: set[int] = set()
    for pairs in post_labels(distribution, posts, config.min_margin, config.min_score):
        for face, cls, margin in pairs:
            if face in decided and decided[face][0] != cls:
                conflicted.add(face)
            decided[face] = (cls, min(margin, decided.get(face, (cls, margin))[1]))
    return {f: v for f, v in decided.items() if f not in conflicted}
