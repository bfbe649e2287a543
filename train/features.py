"""Classical face features (HOG + colour histograms) and a logistic-regression classifier on them.

Cheap to import (numpy, scikit-image, scikit-learn; no TensorFlow). Anime characters are told apart
mostly by hair and eye colour and by the hair's outline, so the features are: a HOG of the grey face
(outline, fringe, hair ornaments) and colour histograms in HSV and Lab, taken over the whole face and
over a coarse grid (the top cells are mostly hair, the middle row mostly eyes).

The fitted classifier is stored as plain arrays (``classical.npz``) plus JSON, not as a pickle: loading
runs no code and does not depend on the scikit-learn version that trained it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FEATURES_FILE = "classical.npz"
CONFIG_FILE = "classical.json"


@dataclass(frozen=True)
class FeatureConfig:
    """What to extract; stored with the model so prediction extracts exactly the same thing."""

    size: int = 64  # faces are resized to size x size before HOG (96 adds dims, not accuracy)
    hog_orientations: int = 9
    hog_cell: int = 8
    hog_block: int = 2
    hue_bins: int = 18
    sat_bins: int = 4
    val_bins: int = 4
    ab_bins: int = 8
    grid: int = 3  # colour histograms per grid x grid cell, on top of the whole-face one
    hog_weight: float = 1.0  # blocks are scaled to equal total weight, then by these factors
    colour_weight: float = 1.0


@dataclass
class ClassicalConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    C: float = 0.1  # strong L2: a few dozen faces per class against thousands of dims
    flip_train: bool = True  # mirrored faces are the same character; doubles the training set
    max_iter: int = 3000


# --------------------------------------------------------------------------------- images ----
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
    return np.stack([load_image(p, size) for p in paths]) if paths else np.zeros((0, size, size, 3), np.uint8)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size and images.shape[2] == size:
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR)) for im in images])


# ------------------------------------------------------------------------------- features ----
def hog_features(images: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    from skimage.color import rgb2gray
    from skimage.feature import hog

    return np.stack(
        [
            hog(
                rgb2gray(im),
                orientations=cfg.hog_orientations,
                pixels_per_cell=(cfg.hog_cell, cfg.hog_cell),
                cells_per_block=(cfg.hog_block, cfg.hog_block),
                block_norm="L2-Hys",
                feature_vector=True,
            )
            for im in images
        ]
    ).astype(np.float32)


def _hist(values: np.ndarray, bins: int, lo: float, hi: float, weights: np.ndarray | None = None) -> np.ndarray:
    h, _ = np.histogram(values, bins=bins, range=(lo, hi), weights=weights)
    total = h.sum()
    return h / total if total > 0 else h.astype(np.float64)


def _colour_cell(hsv: np.ndarray, lab: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    h, s, v = hsv[..., 0].ravel(), hsv[..., 1].ravel(), hsv[..., 2].ravel()
    # hue is meaningless for grey and dark pixels: weight it by how colourful the pixel is
    chroma = s * v
    parts = [
        _hist(h, cfg.hue_bins, 0.0, 1.0, weights=chroma),
        _hist(s, cfg.sat_bins, 0.0, 1.0),
        _hist(v, cfg.val_bins, 0.0, 1.0),
    ]
    a, b = lab[..., 1].ravel(), lab[..., 2].ravel()
    ab, _, _ = np.histogram2d(a, b, bins=cfg.ab_bins, range=[[-64, 64], [-64, 64]])
    parts.append(ab.ravel() / max(ab.sum(), 1.0))
    parts.append(_hist(lab[..., 0].ravel(), cfg.val_bins, 0.0, 100.0))
    return np.concatenate(parts)


def colour_features(images: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    from skimage.color import rgb2hsv, rgb2lab

    out = []
    for im in images:
        rgb = im.astype(np.float32) / 255.0
        hsv, lab = rgb2hsv(rgb), rgb2lab(rgb)
        cells = [_colour_cell(hsv, lab, cfg)]
        n = im.shape[0]
        edges = np.linspace(0, n, cfg.grid + 1).astype(int) if cfg.grid > 1 else []
        for i in range(len(edges) - 1):
            for j in range(len(edges) - 1):
                sl = (slice(edges[i], edges[i + 1]), slice(edges[j], edges[j + 1]))
                cells.append(_colour_cell(hsv[sl], lab[sl], cfg))
        # square root (Hellinger) makes linear models compare histograms sensibly
        out.append(np.sqrt(np.concatenate(cells)))
    return np.asarray(out, dtype=np.float32)


def extract(images: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Feature matrix: HOG and colour blocks, each scaled to unit mean norm so neither drowns the other."""
    small = _resize(images, cfg.size)
    blocks = []
    if cfg.hog_weight > 0:
        hog = hog_features(small, cfg)
        blocks.append(cfg.hog_weight * hog / np.sqrt(hog.shape[1]))
    if cfg.colour_weight > 0:
        col = colour_features(small, cfg)
        blocks.append(cfg.colour_weight * col / np.sqrt(col.shape[1]))
    return np.concatenate(blocks, axis=1)


# ----------------------------------------------------------------------------- classifier ----
def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class ClassicalModel:
    """Standardise -> multinomial logistic regression, kept as arrays so it saves without pickle."""

    config: ClassicalConfig
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (classes, dims)
    intercept: np.ndarray  # (classes,)
    num_classes: int

    def decision(self, feats: np.ndarray) -> np.ndarray:
        z = ((feats - self.mean) / self.scale) @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:  # scikit-learn's binary case: one score for class 1
            z = np.concatenate([np.zeros_like(z), z], axis=1)
        return z

    def predict_proba(self, images: np.ndarray, tta: bool = True) -> np.ndarray:
        feats = extract(images, self.config.features)
        p = _softmax(self.decision(feats))
        if tta:  # average with the mirrored faces: cheap and never hurts a symmetric problem
            p = (p + _softmax(self.decision(extract(images[:, :, ::-1], self.config.features)))) / 2
        return p

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / FEATURES_FILE, mean=self.mean, scale=self.scale, coef=self.coef, intercept=self.intercept)
        cfg = {"features": asdict(self.config.features), "num_classes": self.num_classes}
        cfg.update({k: v for k, v in asdict(self.config).items() if k != "features"})
        (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> ClassicalModel:
        d = Path(directory)
        raw = json.loads((d / CONFIG_FILE).read_text())
        num_classes = raw.pop("num_classes")
        config = ClassicalConfig(features=FeatureConfig(**raw.pop("features")), **raw)
        with np.load(d / FEATURES_FILE) as arrays:
            return cls(config, arrays["mean"], arrays["scale"], arrays["coef"], arrays["intercept"], num_classes)


def fit_classical(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    config: ClassicalConfig | None = None,
    class_weight: dict[int, float] | None = None,
) -> ClassicalModel:
    """Fit on uint8 faces with integer labels 0..num_classes-1 (every class should have a face)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    config = config or ClassicalConfig()
    x = extract(images, config.features)
    y = np.asarray(labels)
    if config.flip_train:
        x = np.concatenate([x, extract(images[:, :, ::-1], config.features)])
        y = np.concatenate([y, y])
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=config.C, max_iter=config.max_iter, class_weight=class_weight)
    clf.fit(scaler.transform(x), y)
    coef, intercept = clf.coef_, clf.intercept_
    if len(clf.classes_) != num_classes and coef.shape[0] != 1:
        # a class missing from this training set: give it no score rather than shifting the others
        full_coef = np.zeros((num_classes, coef.shape[1]))
        full_int = np.full(num_classes, -1e3)
        full_coef[clf.classes_], full_int[clf.classes_] = coef, intercept
        coef, intercept = full_coef, full_int
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    return ClassicalModel(
        config,
        scaler.mean_.astype(np.float64),
        scale.astype(np.float64),
        coef.astype(np.float64),
        intercept.astype(np.float64),
        num_classes,
    )
