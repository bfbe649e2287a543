"""Classical face features (HOG + colour histograms) and a multinomial logistic regression on them.

Design notes: docs/architecture.md, `train/features.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FeatureConfig:
    """What to extract; stored with the model so prediction extracts exactly the same thing."""

    size: int = 64  # faces are resized to size x size first (96 adds dimensions, not accuracy)
    hog: bool = True
    hog_orientations: int = 9
    hog_cell: int = 8
    hog_block: int = 2
    colour: bool = True
    hue_bins: int = 18
    sat_bins: int = 4
    val_bins: int = 4
    ab_bins: int = 8
    grid: int = 4  # colour histograms per grid x grid cell (+ whole face); 4 beat 3 and 6 (FINDINGS.md)
    lab: bool = True  # Lab a*b* (and L*) histograms next to the HSV ones
    hog_weight: float = 1.0  # blocks are scaled to equal total weight, then by these factors
    colour_weight: float = 1.0


# ------------------------------------------------------------------------------ images ----
def load_image(path: str | Path, size: int = 96) -> np.ndarray:
    """One RGB uint8 array of size x size (faces from the pipeline already are 96x96). Through the shared
    loader: a face folder may hold crops from elsewhere (CMYK, 16-bit, EXIF-rotated), read as predict reads."""
    from PIL import Image

    from core.images import open_image

    im = open_image(path)
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def load_images(paths: Sequence[str | Path], size: int = 96) -> np.ndarray:
    """(N, size, size, 3) uint8 from image paths."""
    return np.stack([load_image(p, size) for p in paths]) if paths else np.zeros((0, size, size, 3), np.uint8)


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, size, size, 3); bilinear through PIL (identical at training and prediction)."""
    if images.shape[1:3] == (size, size):
        return images
    from PIL import Image

    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR))
    return out


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """float RGB in 0..1 -> HSV in 0..1 (same convention as skimage.color.rgb2hsv)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    delta = mx - mn
    safe = np.where(delta > 0, delta, 1.0)
    h = np.where(mx == r, (g - b) / safe, np.where(mx == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    s = np.where(mx > 0, delta / np.where(mx > 0, mx, 1.0), 0.0)
    return np.stack([h, s, mx], -1).astype(np.float32)


def _rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """float sRGB in 0..1 -> CIE Lab (D65), vectorised; L in 0..100, a/b roughly -100..100."""
    lin = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = np.array(
        [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
        np.float32,
    )
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883], np.float32)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    lab = np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)
    return lab.astype(np.float32)


# ---------------------------------------------------------------------------- features ----
def hog_features(grey: np.ndarray, orientations: int, cell: int, block: int) -> np.ndarray:
    """Dalal-Triggs HOG (unsigned gradients, L2-Hys blocks) for a batch of grey images (N, H, W).

    Same layout as skimage.feature.hog, but one bincount for the whole batch instead of a Python
    loop per face (about 20x faster); orientations are split linearly between the two nearest bins."""
    n, hgt, wid = grey.shape
    gy = np.zeros_like(grey)
    gx = np.zeros_like(grey)
    gy[:, 1:-1, :] = grey[:, 2:, :] - grey[:, :-2, :]
    gx[:, :, 1:-1] = grey[:, :, 2:] - grey[:, :, :-2]
    mag = np.hypot(gx, gy)
    ang = (np.rad2deg(np.arctan2(gy, gx)) % 180.0) / (180.0 / orientations) - 0.5
    lo = np.floor(ang)
    frac = ang - lo
    b0 = lo.astype(np.int64) % orientations
    b1 = (b0 + 1) % orientations
    cy, cx = hgt // cell, wid // cell
    rows = np.minimum(np.arange(hgt) // cell, cy - 1)
    cols = np.minimum(np.arange(wid) // cell, cx - 1)
    cell_id = (rows[:, None] * cx + cols[None, :])[None] + (np.arange(n) * cy * cx)[:, None, None]
    base = cell_id * orientations
    total = n * cy * cx * orientations
    hist = np.bincount((base + b0).ravel(), (mag * (1 - frac)).ravel(), total)
    hist += np.bincount((base + b1).ravel(), (mag * frac).ravel(), total)
    cells = hist.reshape(n, cy, cx, orientations) / (cell * cell)
    by, bx = cy - block + 1, cx - block + 1
    blocks = np.stack([cells[:, i : i + by, j : j + bx] for i in range(block) for j in range(block)], axis=3).reshape(
        n, by, bx, -1
    )
    eps = 1e-5
    blocks = blocks / np.sqrt((blocks**2).sum(-1, keepdims=True) + eps**2)
    blocks = np.minimum(blocks, 0.2)
    blocks = blocks / np.sqrt((blocks**2).sum(-1, keepdims=True) + eps**2)
    return blocks.reshape(n, -1).astype(np.float32)


def _cell_ids(size: int, grid: int) -> np.ndarray:
    edges = np.linspace(0, size, grid + 1).astype(int)
    idx = np.searchsorted(edges, np.arange(size), side="right") - 1
    return idx[:, None] * grid + idx[None, :]


def _histograms(values: np.ndarray, regions: np.ndarray, n_regions: int, bins: int, weights: np.ndarray | None):
    """Normalised histograms of values (N, H, W) already binned to ints, per (image, region)."""
    n = values.shape[0]
    key = (np.arange(n)[:, None, None] * n_regions + regions[None]) * bins + values
    h = np.bincount(key.ravel(), None if weights is None else weights.ravel(), n * n_regions * bins)
    h = h.reshape(n, n_regions, bins)
    total = h.sum(-1, keepdims=True)
    return h / np.where(total > 0, total, 1.0)


def _bin(x: np.ndarray, bins: int, lo: float, hi: float) -> np.ndarray:
    return np.clip(((x - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)


_LUT_BITS = 6  # colours are looked up at 6 bits per channel: histogram bins are far coarser than that


def _colour_lut(cfg: FeatureConfig) -> tuple[list[tuple[np.ndarray, int]], np.ndarray]:
    """Per quantised RGB colour: its bin in each histogram channel, and its chroma (hue weight).

    Converting every pixel to HSV and Lab costs ~6 ms a face in numpy; a 262,144-entry table built
    once turns it into a few array lookups."""
    key = (cfg.hue_bins, cfg.sat_bins, cfg.val_bins, cfg.ab_bins, cfg.lab)
    if key in _LUTS:
        return _LUTS[key]
    levels = 1 << _LUT_BITS
    q = (np.arange(levels, dtype=np.float32) + 0.5) * (256 / levels) / 255.0
    rgb = np.stack(np.meshgrid(q, q, q, indexing="ij"), -1).reshape(-1, 3)
    hsv = _rgb_to_hsv(rgb)
    channels = [
        (_bin(hsv[:, 0], cfg.hue_bins, 0, 1), cfg.hue_bins),
        (_bin(hsv[:, 1], cfg.sat_bins, 0, 1), cfg.sat_bins),
        (_bin(hsv[:, 2], cfg.val_bins, 0, 1), cfg.val_bins),
    ]
    if cfg.lab:
        lab = _rgb_to_lab(rgb)
        ab = _bin(lab[:, 1], cfg.ab_bins, -64, 64) * cfg.ab_bins + _bin(lab[:, 2], cfg.ab_bins, -64, 64)
        channels += [(ab, cfg.ab_bins**2), (_bin(lab[:, 0], cfg.val_bins, 0, 100), cfg.val_bins)]
    # hue means nothing for grey or dark pixels: its histogram is weighted by colourfulness
    chroma = (hsv[:, 1] * hsv[:, 2]).astype(np.float64)
    _LUTS[key] = (channels, chroma)
    return _LUTS[key]


_LUTS: dict[tuple, tuple[list[tuple[np.ndarray, int]], np.ndarray]] = {}


def colour_features(small: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """HSV (+ Lab) histograms over the whole face and each grid cell, square-rooted (Hellinger)."""
    n, size = small.shape[0], small.shape[1]
    channels, chroma = _colour_lut(cfg)
    shift = 8 - _LUT_BITS
    q = (small >> shift).astype(np.int64)
    index = (q[..., 0] << (2 * _LUT_BITS)) | (q[..., 1] << _LUT_BITS) | q[..., 2]
    weights = [chroma[index]] + [None] * (len(channels) - 1)
    region_sets = [(np.zeros((size, size), np.int64), 1)]
    if cfg.grid > 1:
        region_sets.append((_cell_ids(size, cfg.grid), cfg.grid**2))
    parts = []
    for regions, n_regions in region_sets:
        per_region = [
            _histograms(lut[index], regions, n_regions, b, w) for (lut, b), w in zip(channels, weights, strict=True)
        ]
        parts.append(np.concatenate(per_region, -1).reshape(n, -1))
    return np.sqrt(np.concatenate(parts, 1)).astype(np.float32)


def extract(images: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Feature matrix: HOG and colour blocks, each scaled to unit mean norm so neither drowns the other."""
    small = resize_batch(images, cfg.size)
    blocks = []
    if cfg.hog:
        grey = small.astype(np.float32) @ np.array([0.2125, 0.7154, 0.0721], np.float32) / 255.0
        h = hog_features(grey, cfg.hog_orientations, cfg.hog_cell, cfg.hog_block)
        blocks.append(cfg.hog_weight * h / np.sqrt(h.shape[1]))
    if cfg.colour:
        c = colour_features(small, cfg)
        blocks.append(cfg.colour_weight * c / np.sqrt(c.shape[1]))
    return np.concatenate(blocks, axis=1).astype(np.float32, copy=False)  # float32: half the memory


# -------------------------------------------------------------------------- classifier ----
def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class LinearModel:
    """Standardise -> multinomial logistic regression, as arrays so it saves without pickle."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (classes, dims)
    intercept: np.ndarray  # (classes,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.coef.T + self.intercept

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}mean": self.mean,
            f"{prefix}scale": self.scale,
            f"{prefix}coef": self.coef,
            f"{prefix}intercept": self.intercept,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> LinearModel:
        return cls(*(np.asarray(arrays[f"{prefix}{k}"]) for k in ("mean", "scale", "coef", "intercept")))


def fit_linear(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    C: float,
    max_iter: int = 2000,
    sample_weight: np.ndarray | None = None,
) -> LinearModel:
    """Multinomial logistic regression on standardised features; absent classes get no score."""
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    clf = LogisticRegression(C=C, max_iter=max_iter, tol=1e-4)
    xs = x - mean  # one standardised copy, divided in place (the features can be hundreds of MB)
    xs /= scale
    clf.fit(xs, y, sample_weight=sample_weight)
    del xs
    coef = np.zeros((num_classes, x.shape[1]))
    intercept = np.full(num_classes, -1e3)  # a class missing from training: never predicted
    if coef.shape[0] > 1 and clf.coef_.shape[0] == 1:  # scikit-learn's binary case: one score for class 1
        coef[clf.classes_[1]], intercept[clf.classes_] = clf.coef_[0], [0.0, clf.intercept_[0]]
    else:
        coef[clf.classes_], intercept[clf.classes_] = clf.coef_, clf.intercept_
    return LinearModel(
        mean.astype(np.float32), scale.astype(np.float32), coef.astype(np.float32), intercept.astype(np.float32)
    )
