"""Classifier benchmark: the classical baselines, CNNs from scratch and the chosen ensemble, side by side.

On the real 96x96 crops of the test set (tests/support/testdata.py: resized_for_training, resized_for_test)
it trains each design with several seeds and reports test accuracy and macro-F1 on resized_for_test, a
stratified k-fold cross-validation over train+test pooled (the 18-face test split is too small to decide
alone), training wall time, peak memory and prediction latency per face after warm-up.

    python -m bench.train                       # every design, weights=none
    python -m bench.train --models classical,chosen --seeds 0,1,2 --folds 5
    python -m bench.train --weights PATH        # adds the ImageNet-weights variants (local no-top file)
    python -m bench.train --json out.json       # also writes every number

Each (design, split, seed) trains in its own subprocess: peak RSS (ru_maxrss, TensorFlow's C++ memory
included) is then that run's own, and thread limits hold. --threads (default 1) caps TensorFlow and BLAS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def designs(weights_path: str | None) -> dict[str, Any]:
    """name -> TrainConfig. Imported lazily so the parent process stays free of TensorFlow."""
    from train.features import FeatureConfig
    from train.model import TrainConfig

    chosen = TrainConfig(weights="none")  # the product's design: ResNet from scratch + classical, weight chosen
    out = {
        # the baseline: HOG + one whole-face colour histogram, logistic regression
        "classical-plain": replace(
            chosen,
            backbone="none",
            tta=False,
            flip_train=False,
            C=1.0,
            features=FeatureConfig(grid=1),
            validation_fraction=0.0,
        ),  # fmt: skip
        # the classical half of the chosen design: colour over a 4x4 grid, mirrored faces, strong L2
        "classical": replace(chosen, backbone="none"),
        "resnet": replace(chosen, cnn_weight=1.0),  # the CNN half alone (still calibrated and thresholded)
        "chosen": chosen,
    }
    if weights_path:
        pre = TrainConfig.recommended(weights_path, compare_scratch=False)
        out["mobilenetv2-imagenet"] = replace(pre, cnn_weight=1.0)
        out["chosen-imagenet"] = TrainConfig.recommended(weights_path)  # both CNNs, the better kept
    return out


# ------------------------------------------------------------------------------- one run ----
def run_one(design: str, split: str, seed: int, folds: int, weights_path: str | None, threads: int) -> dict:
    """Train one design on one split (``test`` or ``cv<i>``) in this process; return its numbers."""
    import resource

    from train.model import evaluate, items_from_dir, load_dataset, predict, train

    cfg = replace(designs(weights_path)[design], seed=seed, threads=threads)
    from tests.support.testdata import crop_dirs

    train_dir, test_dir = crop_dirs()
    train_set = load_dataset(items_from_dir(train_dir))
    test_set = load_dataset(items_from_dir(test_dir), train_set.class_names)
    if split.startswith("cv"):
        fold = int(split[2:])
        train_set, test_set = _cv_fold(train_set, test_set, fold, folds)
    t0 = time.perf_counter()
    result = train(train_set, cfg)
    wall = time.perf_counter() - t0
    metrics = evaluate(result.classifier, test_set)
    one = test_set.images[:1]
    for _ in range(3):  # warm-up: graph tracing, first-call allocations
        predict(result.classifier, one)
    n, t1 = 20, time.perf_counter()
    for _ in range(n):
        predict(result.classifier, one)
    latency_ms = (time.perf_counter() - t1) / n * 1000
    return {
        "design": design,
        "split": split,
        "seed": seed,
        "accuracy": metrics.accuracy,
        "macro_f1": metrics.macro_f1,
        "train_s": wall,
        "epochs": result.epochs_run,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "latency_ms": latency_ms,
        "confusion": metrics.confusion,
        "n": metrics.n,
        # the parts' probabilities, so ensemble weights can be studied offline from --json
        "labels": test_set.labels.tolist(),
        "parts": _part_probabilities(result.classifier, test_set.images),
    }


def _part_probabilities(clf: Any, images: Any) -> dict[str, list]:
    parts = {}
    if clf.keras_model is not None:
        parts["cnn"] = clf.cnn_proba(images).round(5).tolist()
    if clf.linear is not None:
        parts["classical"] = clf.classical_proba(images).round(5).tolist()
    return parts


def _cv_fold(train_set: Any, test_set: Any, fold: int, folds: int) -> tuple[Any, Any]:
    """Fold `fold` of a stratified k-fold over train+test pooled (fixed shuffle, same for every design)."""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    from train.model import Dataset

    images = np.concatenate([train_set.images, test_set.images])
    labels = np.concatenate([train_set.labels, test_set.labels])
    tr, te = list(StratifiedKFold(folds, shuffle=True, random_state=1234).split(images, labels))[fold]
    names = train_set.class_names
    return Dataset(images[tr], labels[tr], names), Dataset(images[te], labels[te], names)


# ------------------------------------------------------------------------------- driver ----
def _spawn(design: str, split: str, seed: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        env[var] = str(args.threads)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, "-m", "bench.train", "--one", design, split, str(seed), "--folds", str(args.folds)]
    cmd += ["--threads", str(args.threads)] + (["--weights", args.weights] if args.weights else [])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{design} {split} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _mean_sd(values: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict], names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        test = [r for r in runs if r["design"] == name and r["split"] == "test"]
        cv = [r for r in runs if r["design"] == name and r["split"].startswith("cv")]
        if not test and not cv:
            continue
        row: dict[str, Any] = {"design": name, "seeds": len(test)}
        for key in ("accuracy", "macro_f1", "train_s", "peak_rss_mb", "latency_ms"):
            row[key] = _mean_sd([r[key] for r in test]) if test else (float("nan"), 0.0)
        # pooled CV accuracy: faces right / faces seen over all folds, and the spread across folds
        row["cv"] = _mean_sd([r["accuracy"] for r in cv]) if cv else (float("nan"), 0.0)
        rows.append(row)
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    def pm(v: tuple[float, float], fmt: str = ".3f") -> str:
        return f"{v[0]:{fmt}} ± {v[1]:{fmt}}"

    table = Table(
        title=f"classifiers on the real test crops (seeds {args.seeds}, {args.folds}-fold CV on train+test, "
        f"{args.threads} thread(s))"
    )
    for col in ("design", "test acc", "macro-F1", f"CV acc ({args.folds} folds)", "train s", "peak RSS MB",
                "predict ms/face"):  # fmt: skip
        table.add_column(col, justify="left" if col == "design" else "right")
    for r in rows:
        table.add_row(
            r["design"], pm(r["accuracy"]), pm(r["macro_f1"]), pm(r["cv"]), pm(r["train_s"], ".1f"),
            f"{r['peak_rss_mb'][0]:.0f}", pm(r["latency_ms"], ".1f"),
        )  # fmt: skip
    Console(width=200).print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="classical-plain,classical,resnet,chosen")
    p.add_argument("--seeds", default="0,1,2", help="seeds for the train/test split")
    p.add_argument("--folds", type=int, default=5, help="k of the pooled cross-validation; 0 skips it")
    p.add_argument("--weights", help="local no-top MobileNetV2 (96 px) weights file: adds the pretrained variants")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write every run and the summary here")
    p.add_argument("--one", nargs=3, metavar=("DESIGN", "SPLIT", "SEED"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        design, split, seed = args.one
        print(json.dumps(run_one(design, split, int(seed), args.folds, args.weights, args.threads)))
        return 0
    names = [n for n in args.models.split(",") if n]
    if args.weights:
        names += [n for n in ("mobilenetv2-imagenet", "chosen-imagenet") if n not in names]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    jobs = [(n, "test", s) for n in names for s in seeds]
    jobs += [(n, f"cv{i}", i) for n in names for i in range(args.folds)]  # one seed per fold
    runs = []
    for i, (name, split, seed) in enumerate(jobs, 1):
        run = _spawn(name, split, seed, args)
        runs.append(run)
        print(f"[{i}/{len(jobs)}] {name:22s} {split:5s} seed {seed}: acc {run['accuracy']:.3f} "
              f"({run['train_s']:.1f} s)", file=sys.stderr, flush=True)  # fmt: skip
    rows = summarise(runs, names)
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "summary": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
