"""PNGs a person would rather look at than read: training curves, confusion matrix, face grids, growth."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    return plt


def training_curves_png(history: dict[str, list], path: Path) -> Path:
    """Loss and accuracy per epoch, training and validation, as Keras recorded them."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "-"), (f"val_{metric}", "--")):
            values = [v for v in history.get(key, []) if isinstance(v, int | float)]
            if values:
                ax.plot(range(1, len(values) + 1), values, style, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(plt, fig, path)


def confusion_png(confusion: Sequence[Sequence[int]], names: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    size = max(4, 0.7 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max((max(row) for row in confusion), default=0)
    for i, row in enumerate(confusion):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    ax.set_title("confusion matrix (test split)")
    return _save(plt, fig, path)


def face_grid_png(images: Sequence, captions: Sequence[tuple[str, str]], path: Path, columns: int = 6) -> Path:
    """Faces with `predicted / true` under each; wrong ones in red."""
    plt = _pyplot()
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.9, rows * 2.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, (predicted, true) in zip(axes.flat, images, captions, strict=False):
        ax.imshow(image)
        ax.set_title(f"{predicted}\n(true: {true})", fontsize=7, color="black" if predicted == true else "red")
    return _save(plt, fig, path)


def growth_png(series: dict[str, list[tuple]], path: Path) -> Path:
    """Labelled faces per character over time (cumulative)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, points in sorted(series.items()):
        if points:
            days, totals = zip(*points, strict=True)
            ax.step(days, totals, where="post", label=name)
    ax.set_ylabel("labelled faces")
    ax.set_title("faces per character over time")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.autofmt_xdate()
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    """Lays the figure out, writes it and frees it (pyplot keeps every open figure alive)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
