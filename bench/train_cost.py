"""What a retrain costs at 300 and 3,000 faces: wall seconds, CPU seconds and peak RSS, on holoen-faces.

Each size runs in its own subprocess (its peak RSS, ru_maxrss, is then that retrain's own, TensorFlow's C++
memory included). A run does what the retrain task does, minus the database: load the train faces from
their files, train with the service's settings (``train.retrain.train_config``: by default
WAIFU_BACKBONE_WEIGHTS=imagenet, which offline falls back to weights=none after one quick failed download,
and the CNN's size/epochs planned for the number of faces), judge every label as the doubt check does
(labels.weak), load and evaluate the test faces (about 15% of the train count, stratified, like the
service's split), save the artifacts and draw the two PNGs.

    WAIFU_TEST_DATA=/path/to/shared/data python -m bench.train_cost [--sizes 300,3000] [--json out.json]

The target (issue 11): <= 3 minutes and <= 3 GB at 3,000 faces on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA_SETTING = "WAIFU_TEST_DATA"
TEST_SHARE = 0.15 / 0.85  # test faces per train face in the service's 85/15 split


def holoen_root() -> Path:
    root = os.environ.get(DATA_SETTING)
    if not root or not (Path(root) / "holoen-faces" / "train").is_dir():
        sys.exit(f"error: set {DATA_SETTING} to the shared test-data folder (the one holding holoen-faces/)")
    return Path(root) / "holoen-faces"


def stratified_items(folder: Path, n: int, seed: int = 0) -> list[tuple[Path, str]]:
    """About n (path, character) pairs, the same share of every character's files."""
    import numpy as np

    from train.model import items_from_dir

    items = items_from_dir(folder)
    labels = np.array([label for _, label in items])
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for name in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == name)
        keep.extend(rng.choice(idx, max(2, round(n * len(idx) / len(items))), replace=False).tolist())
    return [items[i] for i in sorted(keep)]


def run_one(n: int) -> dict:
    """One retrain's work on n train faces, in this process."""
    import numpy as np

    from core.settings import Settings
    from labels.weak import DOUBT_FOLDS
    from train.charts import confusion_png, training_curves_png
    from train.features import FeatureConfig, extract, load_images
    from train.model import evaluate, load_dataset, save_artifacts, train
    from train.retrain import accuracy_on, train_config
    from train.weak_inputs import doubt_probabilities

    holo = holoen_root()
    train_items = stratified_items(holo / "train", n)
    test_items = stratified_items(holo / "test", round(n * TEST_SHARE))
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(_env_file=None, data_dir=Path(tmp))
        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        config = train_config(settings)
        classes = sorted({label for _, label in train_items})
        train_set = load_dataset(train_items, classes)
        test_set = load_dataset(test_items, classes)
        all_test = load_images([str(p) for p, _ in test_items], 96)
        load_s = time.perf_counter() - t0
        # the retrain first judges every tag label (labels.weak.flag_doubtful_tags): features of every face,
        # then out-of-fold probabilities for the train faces and a full fit for the test faces
        t_doubt = time.perf_counter()
        feature_config = FeatureConfig()
        x_train = extract(train_set.images, feature_config)
        x_test = extract(test_set.images, feature_config)
        doubt_probabilities(x_train, train_set.labels, np.arange(len(x_train)), len(classes), x_test, DOUBT_FOLDS)
        doubt_s = time.perf_counter() - t_doubt
        result = train(train_set, config)
        metrics = evaluate(result.classifier, test_set)
        accuracy = accuracy_on(result.classifier, all_test, [label for _, label in test_items])
        out = save_artifacts(result.classifier, Path(tmp) / "models" / "v1", metrics)
        training_curves_png(result.history, out / "training_curves.png")
        confusion_png(metrics.confusion, metrics.class_names, out / "confusion_matrix.png")
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        artifact_kb = sum(f.stat().st_size for f in out.iterdir()) / 1024
    info = result.classifier.info
    return {
        "train_faces": len(train_items),
        "test_faces": len(test_items),
        "wall_s": wall,
        "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        "peak_rss_mb": r1.ru_maxrss / 1024,
        "load_s": load_s,
        "doubt_s": doubt_s,
        "classical_s": info.get("classical_s"),
        "cnn_s": info.get("cnn_s"),
        "fit_s": info.get("fit_s"),
        "plan": result.classifier.config.plan,
        "weights_note": result.weights_note,
        "accuracy": accuracy,
        "macro_f1": metrics.macro_f1,
        "cnn_weight": result.classifier.cnn_weight,
        "threshold": result.classifier.threshold,
        "share_unknown": metrics.unknown.get("share_unknown"),
        "artifact_kb": artifact_kb,
        "cores_busy_at_start": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="300,3000", help="train-face counts, one subprocess each")
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one)))
        return 0
    holoen_root()
    rows = []
    for n in (int(s) for s in args.sizes.split(",") if s):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        proc = subprocess.run([sys.executable, "-m", "bench.train_cost", "--one", str(n)], cwd=ROOT, env=env,
                              capture_output=True, text=True)  # fmt: skip
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"size {n} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(lines[-1])
        rows.append(row)
        print(
            f"{row['train_faces']:>5} train / {row['test_faces']:>4} test faces: {row['wall_s']:.0f} s wall, "
            f"{row['cpu_s']:.0f} s CPU, peak RSS {row['peak_rss_mb']:.0f} MB; accuracy {row['accuracy']:.3f}, "
            f"macro-F1 {row['macro_f1']:.3f}; {row['plan']}; load {row['load_s']:.0f} s, doubt check "
            f"{row['doubt_s']:.0f} s, classical "
            f"{row['classical_s']:.0f} s, CNN {row['cnn_s']:.0f} s (load average {row['cores_busy_at_start']:.1f})",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
