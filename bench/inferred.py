"""How often inferred labels and doubt flags (labels.weak) are right, on data where the truth is known.

Needs holoen-faces (20 look-alike characters, 96x96 crops): WAIFU_TEST_DATA must name the folder holding
`holoen-faces/` (the shared test data, as for bench/recognition). Usage::

    WAIFU_TEST_DATA=/work/shared/data .venv/bin/python -m bench.inferred [--tracked 8] [--per-class 80]

**Inferred labels.** `--tracked` characters are tracked; a classifier (train.model, the classical part
alone: `backbone="none"`, what a first small collection gives) is trained on `--per-class` train crops of
each. Synthetic posts are built from the *test* crops:

- one tracked character tagged, its face plus 1-3 faces of untracked characters ("k=1");
- the same, but the tagged character's own face was missed by the detector: only other faces ("k=1
  missed", every inference there is wrong);
- two tracked characters tagged, one face each ("k=2"), and with one of them missed ("k=2 missed").

The model's probabilities go through the rule labels.weak uses (labels.rules.inferred_pairs). For each margin
threshold: coverage (share of posts that got at least one inferred label) and precision (inferred labels
that are right), per kind of post and over a mix with `--missed` of the posts missed.

**Doubt flags.** `--per-class` train crops per tracked character labelled by "tag", `--wrong` of them
replaced by a face of another character (any of the other 19) with the label kept. Out-of-fold probabilities
as labels.weak computes them; for each probability threshold: precision and recall of the flag against the
injected wrong labels (and on a test split judged by a model fitted on all train faces).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.holoen import files, holoen_root, make_posts, sample

MARGINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
MIN_PROBABILITIES = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7)
PROBABILITIES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


# ------------------------------------------------------------------------------ inferred ----
def bench_inferred(args: argparse.Namespace, holo: Path, rng: np.random.Generator) -> None:
    from labels.rules import inferred_pairs
    from train.features import load_images
    from train.model import Dataset, TrainConfig, predict, train

    train_files, test_files = files(holo, "train"), files(holo, "test")
    names = sorted(train_files)
    tracked = sorted(str(t) for t in rng.choice(names, size=args.tracked, replace=False))
    untracked = [n for n in names if n not in tracked]
    items = [(p, t) for t in tracked for p in sample(rng, train_files[t], args.per_class)]
    t0 = time.perf_counter()
    data = Dataset(load_images([p for p, _ in items], 96), np.array([tracked.index(t) for _, t in items]), tracked)
    classifier = train(data, TrainConfig(backbone="none")).classifier
    print(
        f"tracked: {', '.join(tracked)}; classifier on {len(items)} train crops in {time.perf_counter() - t0:.0f}s",
        flush=True,
    )

    posts = make_posts(rng, test_files, tracked, untracked, args.posts)
    paths = sorted({p for post in posts for p, _ in post["faces"]})
    probabilities = dict(zip(paths, predict(classifier, load_images(paths, 96)), strict=True))
    results = []  # per post: [(margin, probability, right)]
    for post in posts:
        scores = np.stack([probabilities[p][[tracked.index(t) for t in post["tags"]]] for p, _ in post["faces"]])
        pairs = inferred_pairs(scores, 0.0)
        results.append([(m, scores[f, c], post["faces"][f][1] == post["tags"][c]) for f, c, m in pairs])

    kinds = ("k1", "k1-missed", "k2", "k2-missed")
    print(f"\n== inferred labels: {args.posts} synthetic posts ({args.posts // 4} of each kind) from test crops ==")
    print(
        "cover = posts with an inferred label; prec = inferred labels that are right; 'mix' weighs missed "
        f"posts {args.missed:.0%}; a pair is kept when margin >= m and its own probability >= p"
    )
    print(f"{'m':>5} {'p':>4} | " + " | ".join(f"{k:^13}" for k in (*kinds, "mix k=1", "mix k=2")))
    print(f"{'':>10} | " + " | ".join(f"{'cover':>6} {'prec':>6}" for _ in range(len(kinds) + 2)))
    for min_p in MIN_PROBABILITIES:
        for t in MARGINS:
            cells, stats = [], {}
            for kind in kinds:
                chosen = [
                    [ok for m, p, ok in r if m >= t and p >= min_p]
                    for r, post in zip(results, posts, strict=True)
                    if post["kind"] == kind
                ]
                labels = [ok for r in chosen for ok in r]
                stats[kind] = (len(chosen), sum(bool(r) for r in chosen), len(labels), sum(labels))
                prec = stats[kind][3] / stats[kind][2] if stats[kind][2] else float("nan")
                cells.append(f"{stats[kind][1] / stats[kind][0]:6.3f} {prec:6.3f}")
            for k in ("k1", "k2"):
                w = {k: 1 - args.missed, f"{k}-missed": args.missed}
                n = sum(w[x] * stats[x][0] for x in w)
                cover = sum(w[x] * stats[x][1] for x in w) / n
                right = sum(w[x] * stats[x][3] for x in w)
                made = sum(w[x] * stats[x][2] for x in w)
                cells.append(f"{cover:6.3f} {right / made if made else float('nan'):6.3f}")
            print(f"{t:5.2f} {min_p:4.2f} | " + " | ".join(cells))


# ------------------------------------------------------------------------------- doubtful ----
def bench_doubt(args: argparse.Namespace, holo: Path, rng: np.random.Generator) -> None:
    from labels.weak import doubt_for
    from train.features import FeatureConfig, extract, load_images
    from train.weak_inputs import doubt_probabilities

    train_files, test_files = files(holo, "train"), files(holo, "test")
    names = sorted(train_files)
    tracked = sorted(str(t) for t in rng.choice(names, size=args.tracked, replace=False))

    def labelled(source: dict[str, list[Path]], per_class: int) -> tuple[list[Path], np.ndarray, np.ndarray]:
        paths, labels, wrong = [], [], []
        for i, t in enumerate(tracked):
            for p in sample(rng, source[t], per_class):
                bad = rng.random() < args.wrong
                if bad:  # the only detected face is someone else's: any other character
                    other = str(rng.choice([n for n in names if n != t]))
                    p = source[other][rng.integers(len(source[other]))]
                paths.append(p)
                labels.append(i)
                wrong.append(bad)
        return paths, np.array(labels), np.array(wrong)

    t0 = time.perf_counter()
    train_paths, y, wrong = labelled(train_files, args.per_class)
    test_paths, y_test, wrong_test = labelled(test_files, max(3, args.per_class // 5))
    config = FeatureConfig()
    x = extract(load_images(train_paths, 96), config)
    x_test = extract(load_images(test_paths, 96), config)
    oof, judged = doubt_probabilities(x, y, np.arange(len(y)), len(tracked), x_test)
    print(
        f"\n== doubt flags: {len(y)} train tag faces ({wrong.sum()} wrong), {len(y_test)} test "
        f"({wrong_test.sum()} wrong), {args.tracked} characters; {time.perf_counter() - t0:.0f}s =="
    )
    print(f"{'p >=':>5} | {'train (out of fold)':^30} | {'test (fitted on train)':^30}")
    print(f"{'':>5} | " + " | ".join(f"{'flagged':>8} {'precision':>10} {'recall':>9}" for _ in range(2)))
    for t in PROBABILITIES:
        cells = []
        for probs, labels, bad in ((oof, y, wrong), (judged, y_test, wrong_test)):
            flags = np.array(
                [doubt_for(p, int(label), tracked, t) is not None for p, label in zip(probs, labels, strict=True)]
            )
            hit = int((flags & bad).sum())
            precision = hit / flags.sum() if flags.sum() else float("nan")
            cells.append(f"{int(flags.sum()):8d} {precision:10.3f} {hit / max(bad.sum(), 1):9.3f}")
        print(f"{t:5.2f} | " + " | ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tracked", type=int, default=8, help="tracked characters (of 20)")
    ap.add_argument("--per-class", type=int, default=80, help="train crops per tracked character")
    ap.add_argument("--posts", type=int, default=800, help="synthetic posts (a quarter of each kind)")
    ap.add_argument("--missed", type=float, default=0.15, help="share of posts whose tagged face was missed")
    ap.add_argument("--wrong", type=float, default=0.1, help="share of tag labels made wrong")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="inferred,doubt")
    args = ap.parse_args()
    holo = holoen_root()
    parts = set(args.parts.split(","))
    if "inferred" in parts:
        bench_inferred(args, holo, np.random.default_rng(args.seed))
    if "doubt" in parts:
        bench_doubt(args, holo, np.random.default_rng(args.seed + 1))


if __name__ == "__main__":
    main()
