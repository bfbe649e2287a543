"""The test set's 96x96 crops per split and character (tests/support/testdata.py), and the three characters
the labelling tests build posts from: two tracked, one (hifumi) never."""

from __future__ import annotations

from pathlib import Path

from tests.support.testdata import IMAGE_SUFFIXES, crop_dirs

MAKI, RIKO, HIFUMI = "nishikino_maki", "sakurauchi_riko", "takimoto_hifumi"  # hifumi is never tracked
TRACKED = [MAKI, RIKO]


def crops(split: str, tag: str) -> list[Path]:
    """A character's crops of the `train` or `test` split, in name order."""
    train_dir, test_dir = crop_dirs()
    folder = (train_dir if split == "train" else test_dir) / tag
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
