"""Benchmark the face classifier on holoen-faces (20 look-alike characters), weights=none.

    cd /work/main && WAIFU_TEST_DATA=/path/to/shared/data .venv/bin/python -m bench.recognition.bench_holoen
    ... -m bench.recognition.bench_holoen --quick          # smoke run, < 3 minutes
    ... -m bench.recognition.bench_holoen --json out.json  # also write every number

In one run it measures the HOG + whole-face colour-histogram logistic-regression baseline and the chosen
design (train/model.py, the product's code) on the same data and machine: test accuracy and macro-F1, fit
seconds, peak RSS, prediction ms/face (batch 1 and 64); a learning curve (25/50/100% of train, stratified,
seed 0); fit time and RSS at 300 and 3,000 training faces; and the unknown-character rule (train on 16
characters, test on all 20). Every fit runs in its own subprocess so its peak RSS is its own (ru_maxrss includes the
process's copy of the data set, ~330 MB) and TensorFlow's thread settings hold.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from train.features import FeatureConfig
from train.model import TrainConfig

DATA_SETTING = "WAIFU_TEST_DATA"
SEED = 0
HELD_OUT = 4  # characters left out of training for the unknown test


# ------------------------------------------------------------------------------ designs ----
def designs(quick: bool = False) -> dict[str, TrainConfig]:
    """name -> config. 'baseline' is the known reference (HOG + whole-face colour histograms, LR,
    mirrored copies and mirrored TTA); 'chosen' is the full design (64 px, 15 epochs, no time budget);
    'chosen-3k' the product's default, whose CNN size/epochs follow the number of faces (48 px and
    6 epochs at 3,000 faces: the <3 minute retrain)."""
    chosen = TrainConfig(weights="none", cnn_budget_s=0)
    out = {
        "baseline": TrainConfig(backbone="none", features=FeatureConfig(grid=1), C=0.1, validation_fraction=0.0),
        "classical": replace(chosen, backbone="none"),
        "chosen": chosen,
        "chosen-3k": TrainConfig(weights="none"),
    }
    if quick:  # same code paths, a fraction of the work
        for name in ("chosen", "chosen-3k"):
            out[name] = replace(out[name], epochs=2, warmup_epochs=0)
    return out


# --------------------------------------------------------------------------------- data ----
def load_split(
    root: Path, split: str, class_names: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    folder = root / split
    names = class_names or sorted(p.name for p in folder.iterdir() if p.is_dir())
    images, labels = [], []
    for i, name in enumerate(names):
        for f in sorted((folder / name).iterdir()):
            if f.suffix.lower() not in {".jpg", ".jpeg", ".png", ".webp"}:
                continue
            with Image.open(f) as im:
                im = im.convert("RGB")
                if im.size != (96, 96):
                    im = im.resize((96, 96), Image.Resampling.BILINEAR)
                images.append(np.asarray(im, dtype=np.uint8))
            labels.append(i)
    return np.stack(images), np.array(labels, dtype=np.int64), names


def stratified_subset(labels: np.ndarray, size: float, seed: int = SEED) -> np.ndarray:
    """Indices of a stratified sample: `size` <= 1 is a fraction of each class, > 1 a total count."""
    rng = np.random.default_rng(seed)
    frac = size if size <= 1 else size / len(labels)
    keep: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.extend(rng.choice(idx, max(2, int(round(frac * len(idx)))), replace=False))
    return np.sort(np.array(keep, dtype=np.int64))


def held_out_classes(k: int, seed: int = SEED) -> list[int]:
    return sorted(np.random.default_rng(seed).choice(k, HELD_OUT, replace=False).tolist())


# -------------------------------------------------------------------------------- a job ----
def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true)))


def latency_ms(clf: Any, images: np.ndarray) -> dict[str, float]:
    """ms per face after warm-up: one face at a time, and batches of 64."""
    from train.model import predict as predict_proba

    predict_proba(clf, images[:1])
    predict_proba(clf, images[:64])
    t = time.perf_counter()
    n1 = 20
    for i in range(n1):
        predict_proba(clf, images[i : i + 1])
    b1 = (time.perf_counter() - t) / n1 * 1000
    t = time.perf_counter()
    reps = 4
    for i in range(reps):
        predict_proba(clf, images[i * 64 : (i + 1) * 64])
    b64 = (time.perf_counter() - t) / (reps * 64) * 1000
    return {"ms_per_face_batch1": b1, "ms_per_face_batch64": b64}


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_job(job: dict[str, Any], data_file: str) -> dict[str, Any]:
    """One fit + evaluation, in this (child) process."""
    from train import model as M

    cfg = designs(job.get("quick", False))[job["design"]]
    with np.load(data_file) as d:
        x_tr, y_tr, x_te, y_te = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
        names = [str(n) for n in d["names"]]
    out: dict[str, Any] = dict(job)
    if job.get("unknown"):
        held = held_out_classes(len(names))
        known = [c for c in range(len(names)) if c not in held]
        remap = np.full(len(names), -1)
        remap[known] = np.arange(len(known))
        keep = np.isin(y_tr, known)
        x_tr, y_tr = x_tr[keep], remap[y_tr[keep]]
        names_fit = [names[c] for c in known]
        out["held_out"] = [names[c] for c in held]
    else:
        names_fit = names
    if job.get("size", 1.0) != 1.0:
        idx = stratified_subset(y_tr, job["size"])
        x_tr, y_tr = x_tr[idx], y_tr[idx]
    out["n_train"] = int(len(x_tr))
    t, cpu = time.perf_counter(), _cpu_seconds()
    clf = M.train(M.Dataset(x_tr, y_tr, names_fit), cfg).classifier
    out["fit_s"] = time.perf_counter() - t
    # CPU seconds do not grow when other work shares the cores the way wall seconds do
    out["fit_cpu_s"] = _cpu_seconds() - cpu
    out["info"] = clf.info
    out["plan"] = clf.config.plan
    out["cnn_weight"], out["threshold"] = clf.cnn_weight, clf.threshold
    t = time.perf_counter()
    if job.get("unknown"):
        p = M.predict(clf, x_te)
        out["predict_s"] = time.perf_counter() - t
        is_known = remap[y_te] >= 0
        pred = M.predict_labels(clf, p)
        truth = remap[y_te]
        out["known_accuracy_no_threshold"] = float((p.argmax(1) == truth)[is_known].mean())
        out["known_named"] = float((pred >= 0)[is_known].mean())
        out["known_named_right"] = float((pred == truth)[is_known].mean())
        out["unknown_rejected"] = float((pred < 0)[~is_known].mean())
        # the same rule at other percentiles, from the thresholds fit() recorded
        sweep = {}
        for pct, thr in clf.info.get("threshold_by_percentile", {}).items():
            named = p.max(1) >= thr
            right = named & (p.argmax(1) == truth)
            sweep[pct] = {
                "threshold": thr,
                "known_named_right": float(right[is_known].mean()),
                "known_named": float(named[is_known].mean()),
                "unknown_rejected": float((~named)[~is_known].mean()),
            }
        out["sweep"] = sweep
    else:
        p = M.predict(clf, x_te)
        out["predict_s"] = time.perf_counter() - t
        pred = p.argmax(1)
        out["accuracy"] = float((pred == y_te).mean())
        out["macro_f1"] = macro_f1(y_te, pred)
        if job.get("components") and clf.keras_model is not None and clf.linear is not None:
            # the two halves of the same fit, alone (ablation at no extra training cost)
            for name, w in (("cnn_only", 1.0), ("classical_only", 0.0)):
                part = replace(clf, cnn_weight=w)
                part._infer_fn = clf._infer_fn
                pp = M.predict(part, x_te).argmax(1)
                out[f"{name}_accuracy"] = float((pp == y_te).mean())
                out[f"{name}_macro_f1"] = macro_f1(y_te, pp)
        if job.get("latency"):
            out.update(latency_ms(clf, x_te))
        if job.get("save"):
            with tempfile.TemporaryDirectory() as tmp:  # round trip: the saved model predicts the same
                M.save_artifacts(clf, tmp)
                again = M.load_artifacts(tmp)
                out["reload_max_abs_diff"] = float(np.abs(M.predict(again, x_te[:64]) - p[:64]).max())
                out["artifact_kb"] = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 1024
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def spawn(job: dict[str, Any], data_file: str, log: Any, partial: Path | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.recognition.bench_holoen", "--job", json.dumps(job), "--data-file", data_file]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    if proc.returncode != 0:
        raise RuntimeError(f"job {job} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t
    print(f"  done {job} in {res['wall_s']:.0f}s", file=log, flush=True)
    if partial is not None:  # every finished job at once: a long run that dies later loses nothing
        with partial.open("a") as f:
            f.write(json.dumps(res, default=float) + "\n")
    return res


# ------------------------------------------------------------------------------ reports ----
def _row(cols: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) + 2 for col in zip(header, *rows, strict=True)]
    return [_row(header, widths)] + [_row(r, widths) for r in rows]


def report(results: dict[str, Any]) -> str:
    """The tables, as text. 'cpu s' is the fit's CPU time: on a shared machine it moves far less than
    wall seconds; on an idle 2-core machine wall seconds are roughly cpu s / 1.5-2."""
    lines = ["== holoen-faces test split (weights=none, same run) =="]
    rows = []
    for name in ("baseline", "classical", "chosen"):
        r = results["main"].get(name)
        if r:
            rows.append([name, f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}", f"{r['fit_s']:.0f}",
                         f"{r['fit_cpu_s']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r.get('ms_per_face_batch1', 0):.1f}",
                         f"{r.get('ms_per_face_batch64', 0):.2f}", str(r["n_train"])])  # fmt: skip
    header = ["design", "acc", "macroF1", "fit s", "cpu s", "RSS MB", "ms/face@1", "ms/face@64", "n_train"]
    lines += _table(header, rows)
    ch = results["main"].get("chosen", {})
    if "cnn_only_accuracy" in ch:
        lines.append(
            f"  chosen's parts: cnn alone {ch['cnn_only_accuracy']:.4f} (F1 {ch['cnn_only_macro_f1']:.4f}), "
            f"classical alone {ch['classical_only_accuracy']:.4f} (F1 {ch['classical_only_macro_f1']:.4f}); "
            f"cnn weight {ch['cnn_weight']:.2f} (chosen on validation, validation acc "
            f"{ch['info'].get('validation_accuracy', 0):.4f})"
        )
    if "reload_max_abs_diff" in ch:
        lines.append(f"  save/load: max |dp| {ch['reload_max_abs_diff']:.2e}, artifact {ch['artifact_kb']:.0f} KB")
    if results.get("small"):
        lines += ["", "== small retrains (fit = features + both models + validation) =="]
        rows = [[r["design"], str(r["n_train"]), f"{r['fit_s']:.0f}", f"{r['fit_cpu_s']:.0f}",
                 f"{r['peak_rss_mb']:.0f}", f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}"]
                for r in results["small"]]  # fmt: skip
        lines += _table(["design", "n_train", "fit s", "cpu s", "RSS MB", "acc", "macroF1"], rows)
    u = results.get("unknown")
    if u:
        lines += [
            "",
            f"== unknown characters: trained on {u['n_train']} faces of 16; held out {', '.join(u['held_out'])} ==",
            f"threshold {u['threshold']:.3f}: percentile rule on the fit's validation slice (max probability of "
            f"correctly named faces)",
            f"known faces: accuracy without threshold {u['known_accuracy_no_threshold']:.4f}, named "
            f"{u['known_named']:.4f}, named and right {u['known_named_right']:.4f}; held-out faces called unknown "
            f"{u['unknown_rejected']:.4f}",
        ]
        rows = [[pct, f"{s['threshold']:.3f}", f"{s['known_named_right']:.4f}", f"{s['known_named']:.4f}",
                 f"{s['unknown_rejected']:.4f}"] for pct, s in u.get("sweep", {}).items()]  # fmt: skip
        lines += _table(["percentile", "threshold", "known right", "known named", "unknown rejected"], rows)
    if results.get("curve"):
        lines += ["", "== learning curve (stratified subsample of train, seed 0) =="]
        rows = [[r["design"], f"{r['size']:.0%}", str(r["n_train"]), f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}",
                 f"{r['fit_s']:.0f}", f"{r['fit_cpu_s']:.0f}"] for r in results["curve"]]  # fmt: skip
        lines += _table(["design", "share", "n_train", "acc", "macroF1", "fit s", "cpu s"], rows)
    return "\n".join(lines)


def _full_points(main: dict[str, Any]) -> list[dict[str, Any]]:
    """The learning curve's 100% rows are the main fits."""
    return [{**main[name], "size": 1.0} for name in ("baseline", "chosen") if name in main]


def results_from_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rebuild the report's results from finished-job records (the --json run's .partial.jsonl files):
    for a run that was stopped, or parts run as separate commands."""
    results: dict[str, Any] = {"main": {}, "curve": [], "small": []}
    for r in records:
        size = r.get("size", 1.0)
        if r.get("unknown"):
            results["unknown"] = r
        elif size == 1.0:
            results["main"][r["design"]] = r
        elif size > 1:
            results["small"].append(r)
        else:
            results["curve"].append(r)
    results["curve"] = sorted(results["curve"], key=lambda r: (r["size"], r["design"]))
    results["curve"] += _full_points(results["main"])
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small subsets, 2 CNN epochs (< 3 minutes)")
    ap.add_argument("--parts", default="main,curve,small,unknown", help="comma list of: main,curve,small,unknown")
    ap.add_argument("--json", help="also write every number to this file")
    ap.add_argument("--report-from", help="print the tables from comma-separated .partial.jsonl files; run nothing")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--data-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:  # child process: one fit
        print(json.dumps(run_job(json.loads(args.job), args.data_file)))
        return
    if args.report_from:
        records = [json.loads(line) for f in args.report_from.split(",") for line in Path(f).read_text().splitlines()]
        print(report(results_from_records(records)))
        return
    root = os.environ.get(DATA_SETTING)
    if not root:
        sys.exit(f"error: set {DATA_SETTING} to the shared test-data folder (the one holding holoen-faces/)")
    holo = Path(root) / "holoen-faces"
    if not (holo / "train").is_dir():
        sys.exit(f"error: {holo}/train not found: {DATA_SETTING} must point at the folder holding holoen-faces/")
    parts = set(filter(None, args.parts.split(",")))
    if args.quick:
        parts &= {"main", "unknown"}
    t0 = time.perf_counter()
    x_tr, y_tr, names = load_split(holo, "train")
    x_te, y_te, _ = load_split(holo, "test", names)
    log = sys.stderr
    print(
        f"loaded {len(x_tr)} train / {len(x_te)} test faces, {len(names)} characters in "
        f"{time.perf_counter() - t0:.0f}s",
        file=log,
        flush=True,
    )
    q = args.quick
    results: dict[str, Any] = {"main": {}, "curve": [], "small": [], "command": " ".join(sys.argv), "quick": q}
    with tempfile.TemporaryDirectory() as tmp:
        data_file = str(Path(tmp) / "holoen.npz")
        if q:  # the smoke run trains on a stratified 600-face sample; the test split stays whole
            idx = stratified_subset(y_tr, 600)
            x_tr, y_tr = x_tr[idx], y_tr[idx]
        np.savez(data_file, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, names=np.array(names))
        base = {"quick": q}
        partial = Path(args.json).with_suffix(".partial.jsonl") if args.json else None
        for name in ("baseline", "classical", "chosen") if "main" in parts else ():
            job = {**base, "design": name, "latency": True}
            if name == "chosen":
                job.update(components=True, save=True)
            results["main"][name] = spawn(job, data_file, log, partial)
        if "small" in parts:
            for size in (300, 3000):
                for name in ("baseline", "chosen-3k", "chosen"):
                    results["small"].append(spawn({**base, "design": name, "size": size}, data_file, log, partial))
        if "unknown" in parts:
            job = {**base, "design": "chosen", "unknown": True}
            results["unknown"] = spawn(job, data_file, log, partial)
        if "curve" in parts:
            for size in (0.25, 0.5):
                for name in ("baseline", "chosen"):
                    results["curve"].append(spawn({**base, "design": name, "size": size}, data_file, log, partial))
            results["curve"] += _full_points(results["main"])
    results["total_s"] = time.perf_counter() - t0
    text = report(results)
    print(text)
    print(f"\n(total {results['total_s']:.0f}s; command: {results['command']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
