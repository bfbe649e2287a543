"""The whole classifier of a model version as one TensorFlow graph: 96x96 RGB faces in, probabilities out.

Design notes: docs/architecture.md, `waifu/export/graph.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit resampling (libImaging/Resample.c)


def INPUT_SPEC(tf: Any, face_size: int) -> Any:  # upper case: a constant, built where TensorFlow is imported
    return tf.TensorSpec([None, face_size, face_size, 3], tf.float32, name="faces")


class NotExportable(ValueError):
    """The model uses a setting the graph does not rebuild (says which)."""


def pil_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(in_size, out_size) integer weights of Pillow's bilinear resize along one axis (8-bit images):
    out = clip(floor((sum in * w + 2^(P-1)) / 2^P)), P = PRECISION_BITS."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ss = 1.0 / filterscale
    matrix = np.zeros((in_size, out_size), np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        weights = [max(0.0, 1.0 - abs((x + xmin - center + 0.5) * ss)) for x in range(xmax - xmin)]
        total = sum(weights)
        for x, w in enumerate(weights):
            w = w / total if total else w
            scaled = w * (1 << PRECISION_BITS)
            matrix[xmin + x, xx] = int(scaled - 0.5) if w < 0 else int(scaled + 0.5)
    return matrix


def _check(cfg: Any) -> None:
    if cfg.hog and cfg.size % cfg.hog_cell:
        raise NotExportable(f"HOG cells of {cfg.hog_cell} px do not tile {cfg.size} px faces")


class EnsembleGraph:
    """Builds the tf.Module; `module.serve(faces)` -> {"probabilities": (N, classes)}."""

    def __init__(self, classifier: Any, face_size: int = 96) -> None:
        self.clf = classifier
        self.face_size = face_size
        self.cfg = classifier.config.features
        self._constants: dict[str, Any] = {}  # built once: the mirror view and every region set share them
        _check(self.cfg)

    def _constant(self, tf: Any, name: str, make: Any) -> Any:
        if name not in self._constants:
            self._constants[name] = tf.constant(make())
        return self._constants[name]

    # ------------------------------------------------------------------ classical features ----
    def _resize(self, tf: Any, images: Any) -> Any:
        """Pillow's bilinear resize of uint8-valued float64 images to cfg.size."""
        size = self.cfg.size
        if self.face_size == size:
            return images
        m = self._constant(tf, "resize", lambda: pil_bilinear_matrix(self.face_size, size))
        half, unit = float(1 << (PRECISION_BITS - 1)), float(1 << PRECISION_BITS)

        def rounded(x: Any) -> Any:
            return tf.clip_by_value(tf.floor((x + half) / unit), 0.0, 255.0)

        x = rounded(tf.einsum("nyxc,xk->nykc", images, m))  # horizontal pass first, as Pillow
        return rounded(tf.einsum("nyxc,yk->nkxc", x, m))

    def _hog(self, tf: Any, small: Any) -> Any:
        cfg = self.cfg
        grey = tf.tensordot(tf.cast(small, tf.float32), tf.constant([0.2125, 0.7154, 0.0721]), 1) / 255.0
        zeros_row = tf.zeros_like(grey[:, :1, :])
        zeros_col = tf.zeros_like(grey[:, :, :1])
        gy = tf.concat([zeros_row, grey[:, 2:, :] - grey[:, :-2, :], zeros_row], 1)
        gx = tf.concat([zeros_col, grey[:, :, 2:] - grey[:, :, :-2], zeros_col], 2)
        mag = tf.sqrt(gx * gx + gy * gy)
        degrees = tf.atan2(gy, gx) * (180.0 / np.pi)
        ang = tf.math.floormod(degrees, 180.0) / (180.0 / cfg.hog_orientations) - 0.5
        lo = tf.floor(ang)
        frac = ang - lo
        b0 = tf.math.floormod(tf.cast(lo, tf.int32), cfg.hog_orientations)
        b1 = tf.math.floormod(b0 + 1, cfg.hog_orientations)
        votes = tf.one_hot(b0, cfg.hog_orientations) * (mag * (1 - frac))[..., None]
        votes += tf.one_hot(b1, cfg.hog_orientations) * (mag * frac)[..., None]
        cell = cfg.hog_cell
        hist = tf.nn.avg_pool2d(votes, cell, cell, "VALID")  # sum over the cell / (cell * cell)
        cells = cfg.size // cell
        span = cells - cfg.hog_block + 1
        blocks = tf.concat(
            [hist[:, i : i + span, j : j + span, :] for i in range(cfg.hog_block) for j in range(cfg.hog_block)], -1
        )
        eps2 = 1e-5**2
        blocks = blocks / tf.sqrt(tf.reduce_sum(blocks * blocks, -1, keepdims=True) + eps2)
        blocks = tf.minimum(blocks, 0.2)
        blocks = blocks / tf.sqrt(tf.reduce_sum(blocks * blocks, -1, keepdims=True) + eps2)
        return tf.reshape(blocks, [-1, span * span * cfg.hog_block * cfg.hog_block * cfg.hog_orientations])

    def _colour(self, tf: Any, small: Any) -> Any:
        from train.features import _LUT_BITS, _cell_ids, _colour_lut

        cfg = self.cfg
        channels, chroma = _colour_lut(cfg)
        q = tf.cast(small, tf.int32) // (1 << (8 - _LUT_BITS))
        index = q[..., 0] * (1 << (2 * _LUT_BITS)) + q[..., 1] * (1 << _LUT_BITS) + q[..., 2]
        index = tf.reshape(index, [-1, cfg.size * cfg.size])
        hue_weight = tf.gather(self._constant(tf, "chroma", lambda: chroma.astype(np.float32)), index)
        regions = [np.zeros((cfg.size, cfg.size), np.int64)] + ([_cell_ids(cfg.size, cfg.grid)] if cfg.grid > 1 else [])
        parts = []
        for region_map in regions:
            n_regions = int(region_map.max()) + 1
            member = self._constant(  # (pixels, regions)
                tf, f"regions{n_regions}", lambda m=region_map, n=n_regions: np.eye(n, dtype=np.float32)[m.reshape(-1)]
            )
            per_channel = []
            for c, (lut, bins) in enumerate(channels):
                table = self._constant(tf, f"lut{c}", lambda lut=lut: lut.astype(np.int32))
                votes = tf.one_hot(tf.gather(table, index), bins)
                if c == 0:
                    votes = votes * hue_weight[..., None]  # hue means little for grey pixels
                h = tf.einsum("npb,pr->nrb", votes, member)
                total = tf.reduce_sum(h, -1, keepdims=True)
                per_channel.append(h / tf.where(total > 0, total, tf.ones_like(total)))
            joined = tf.concat(per_channel, -1)
            parts.append(tf.reshape(joined, [-1, n_regions * sum(b for _, b in channels)]))
        return tf.sqrt(tf.concat(parts, 1))

    def _features(self, tf: Any, faces: Any) -> Any:
        cfg = self.cfg
        small = self._resize(tf, tf.cast(faces, tf.float64))
        blocks = []
        if cfg.hog:
            h = self._hog(tf, small)
            blocks.append(cfg.hog_weight * h / float(np.sqrt(h.shape[1])))
        if cfg.colour:
            c = self._colour(tf, small)
            blocks.append(cfg.colour_weight * c / float(np.sqrt(c.shape[1])))
        return tf.concat(blocks, 1)

    def _classical(self, tf: Any, faces: Any) -> Any:
        lin = self.clf.linear
        mean, scale = tf.constant(lin.mean, tf.float32), tf.constant(lin.scale, tf.float32)
        coef, intercept = tf.constant(lin.coef.T, tf.float32), tf.constant(lin.intercept, tf.float32)
        views = [faces, tf.reverse(faces, [2])] if self.clf.config.tta else [faces]
        probs = [tf.nn.softmax(tf.matmul((self._features(tf, v) - mean) / scale, coef) + intercept) for v in views]
        return _sharpen(tf, tf.add_n(probs) / len(probs), self.clf.temperature_classical)

    # ------------------------------------------------------------------------------ CNN ----
    def _cnn(self, tf: Any, faces: Any) -> Any:
        size = self.clf.cnn_size
        n = tf.shape(faces)[0]
        boxes = tf.tile(tf.constant([[0.0, 0.0, 1.0, 1.0]]), [n, 1])
        x = tf.image.crop_and_resize(faces, boxes, tf.range(n), [size, size])  # as train.model._cnn_input
        model = self.clf.keras_model
        if self.clf.config.tta:
            p = tf.nn.softmax(model(tf.concat([x, tf.reverse(x, [2])], 0), training=False))
            p = (p[:n] + p[n:]) / 2
        else:
            p = tf.nn.softmax(model(x, training=False))
        return _sharpen(tf, p, self.clf.temperature_cnn)

    # --------------------------------------------------------------------------- module ----
    def module(self) -> Any:
        import tensorflow as tf

        clf = self.clf
        w = clf.cnn_weight if clf.keras_model is not None else 0.0
        w = w if clf.linear is not None else 1.0
        graph = self

        class Ensemble(tf.Module):
            def __init__(self) -> None:
                super().__init__(name="waifu_face_classifier")
                self.cnn = clf.keras_model  # tracked: its variables are saved with the module

            @tf.function(input_signature=[INPUT_SPEC(tf, graph.face_size)])
            def serve(self, faces: Any) -> dict[str, Any]:
                graph._constants.clear()  # constants belong to the graph being traced
                faces = tf.clip_by_value(tf.round(faces), 0.0, 255.0)  # the uint8 pixels predict sees
                p = tf.zeros([tf.shape(faces)[0], len(clf.class_names)], tf.float32)
                if w > 0:
                    p += w * tf.cast(graph._cnn(tf, faces), tf.float32)
                if w < 1:
                    p += (1 - w) * tf.cast(graph._classical(tf, faces), tf.float32)
                return {"probabilities": p}

        return Ensemble()


def _sharpen(tf: Any, p: Any, temperature: float) -> Any:
    """train.model.sharpen: softmax(log p / T)."""
    if temperature == 1.0:
        return p
    return tf.nn.softmax(tf.math.log(tf.maximum(p, 1e-12)) / temperature)
