"""holoen-faces for the benchmarks (20 look-alike characters, 96x96 crops, train/ and test/ per character):
where it is (WAIFU_TEST_DATA names the folder holding `holoen-faces/`), its crops per character, samples, and
synthetic posts built from them (the truth of each face known)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np


def holoen_root() -> Path:
    root = os.environ.get("WAIFU_TEST_DATA")
    if not root:
        sys.exit("error: set WAIFU_TEST_DATA to the shared test-data folder (the one holding holoen-faces/)")
    holo = Path(root) / "holoen-faces"
    if not (holo / "train").is_dir() and (Path(root).parent / "holoen-faces" / "train").is_dir():
        holo = Path(root).parent / "holoen-faces"  # WAIFU_TEST_DATA named transfer-learning-anime itself
    if not (holo / "train").is_dir():
        sys.exit(f"error: {holo}/train not found: WAIFU_TEST_DATA must name the folder holding holoen-faces/")
    return holo


def files(holo: Path, split: str) -> dict[str, list[Path]]:
    return {d.name: sorted(d.iterdir()) for d in sorted((holo / split).iterdir()) if d.is_dir()}


def sample(rng: np.random.Generator, paths: list[Path], n: int) -> list[Path]:
    return [paths[i] for i in rng.choice(len(paths), size=min(n, len(paths)), replace=False)]


def seeded_crops(seed: int) -> tuple[np.random.Generator, dict[str, list[Path]], dict[str, list[Path]]]:
    """A run's random generator, and the train and test crops per character."""
    holo = holoen_root()
    return np.random.default_rng(seed), files(holo, "train"), files(holo, "test")


def make_posts(
    rng: np.random.Generator, test: dict[str, list[Path]], tracked: list[str], untracked: list[str], n: int
) -> list[dict]:
    """Posts of four kinds: faces (path, true character) and the tagged characters."""
    posts = []
    for i in range(n):
        kind = ("k1", "k1-missed", "k2", "k2-missed")[i % 4]
        others = [(test[u][rng.integers(len(test[u]))], u) for u in rng.choice(untracked, size=3, replace=False)]
        if kind.startswith("k1"):
            tags = [str(rng.choice(tracked))]
            faces = others[: int(rng.integers(1, 4))]
            if kind == "k1":
                faces.append((test[tags[0]][rng.integers(len(test[tags[0]]))], tags[0]))
            else:
                faces.append(others[-1])  # as many faces as a post with the character, none of them it
        else:
            tags = [str(t) for t in rng.choice(tracked, size=2, replace=False)]
            faces = [(test[t][rng.integers(len(test[t]))], t) for t in tags]
            if kind == "k2-missed":
                faces[1] = others[0]
        order = rng.permutation(len(faces))
        posts.append({"kind": kind, "tags": tags, "faces": [faces[j] for j in order]})
    return posts
