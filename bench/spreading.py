"""Inferred labels for ambiguous faces: the model's assignment (labels.weak today) against label spreading
over a k-nearest-neighbour graph of the faces (labels.spreading), and both, on holoen-faces where the truth
is known. Usage::

    WAIFU_TEST_DATA=/work/shared/data .venv/bin/python -m bench.spreading [--tracked 8] [--per-class 80]

`--tracked` characters are tracked; `--per-class` train crops of each are `tag` faces (the seeds, and what
the model is trained on: train.model with backbone="none", the classical part alone, as bench/inferred.py).
Synthetic posts from the *test* crops, as bench/inferred.py builds them (one or two tracked characters
tagged, 1-3 faces of untracked characters beside them), `--missed` of them with the tagged face missed by
the detector (every label there is wrong). Every face of every post is open (ambiguous).

Each method gives per post (face, character, margin, score) pairs through the post's assignment
(labels.rules.inferred_pairs: only the post's characters, each to at most one face). The posts are split in
two halves: on the *validation* half the thresholds (min margin, min score) with the most right labels at
precision >= `--precision` (the lower end of its 90% interval) are chosen, and those thresholds are reported
on the *report* half: labels made, precision, coverage (right labels / faces that are one of their post's
tagged characters, the most any method could label). `both` takes the model's labels and adds spreading's for
the faces the model left open (a face the two disagree on gets none); `mean` runs the assignment on the
average of the model's probabilities and the spread distribution; `iterated` does the same, but the faces
the first round places with a margin of at least 0.6 become seeds and the labels spread again
(labels.spreading.spread_with_posts).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.holoen import make_posts, sample, seeded_crops

KINDS = ("k1", "k1-missed", "k2", "k2-missed")
MARGINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SCORES = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def mixed_posts(rng, test, tracked, untracked, n: int, missed: float) -> list[dict]:
    """n posts, half with one tracked character and half with two; `missed` of each with a face missed."""
    pool = make_posts(rng, test, tracked, untracked, 4 * n)
    by_kind = {k: [p for p in pool if p["kind"] == k] for k in KINDS}
    want = {"k1": (1 - missed) / 2, "k1-missed": missed / 2, "k2": (1 - missed) / 2, "k2-missed": missed / 2}
    posts = [p for k in KINDS for p in by_kind[k][: round(n * want[k])]]
    return [posts[i] for i in rng.permutation(len(posts))]


def pairs_for(posts, scores_of, min_margin: float = 0.0, min_score: float = 0.0) -> list[list[tuple]]:
    """Per post: (face path, tag, margin, score, right) for the pairs the assignment keeps."""
    from labels.rules import inferred_pairs

    out = []
    for post in posts:
        scores = np.stack([scores_of(p, post["tags"]) for p, _ in post["faces"]])
        out.append(
            [
                (post["faces"][f][0], post["tags"][c], m, float(scores[f, c]), post["faces"][f][1] == post["tags"][c])
                for f, c, m in inferred_pairs(scores, min_margin, min_score)
            ]
        )
    return out


def resolvable(posts) -> int:
    return sum(truth in post["tags"] for post in posts for _, truth in post["faces"])


def kept(results, margin: float, score: float) -> list[list[tuple]]:
    return [[r for r in post if r[2] >= margin and r[3] >= score] for post in results]


def stats(results) -> tuple[int, int]:
    labels = [r for post in results for r in post]
    return len(labels), sum(r[4] for r in labels)


def lower_bound(right: int, made: int, z: float = 1.28) -> float:
    """Wilson score interval's lower end (one-sided 90%): a precision the next posts should still reach."""
    if not made:
        return 0.0
    p = right / made
    centre = p + z * z / (2 * made)
    spread = z * np.sqrt(p * (1 - p) / made + z * z / (4 * made * made))
    return (centre - spread) / (1 + z * z / made)


def choose(results, posts, target: float) -> tuple[float, float] | None:
    """The (margin, score) thresholds with the most right labels whose precision on these posts is at least
    `target` with 90% confidence (the best of many settings on one half is optimistic on the other)."""
    best, best_right = None, -1
    for m in MARGINS:
        for s in SCORES:
            made, right = stats(kept(results, m, s))
            if made and lower_bound(right, made) >= target and right > best_right:
                best, best_right = (m, s), right
    return best


def both(model_results, spread_results) -> list[list[tuple]]:
    """The model's labels, then spreading's for faces the model left open; a disagreement gives none."""
    out = []
    for a, b in zip(model_results, spread_results, strict=True):
        mine = {r[0]: r for r in a}
        theirs = {r[0]: r for r in b}
        merged = []
        for face in sorted(set(mine) | set(theirs)):
            if face in mine and face in theirs and mine[face][1] != theirs[face][1]:
                continue
            merged.append(mine.get(face) or theirs[face])
        out.append(merged)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tracked", type=int, default=8, help="tracked characters (of 20)")
    ap.add_argument("--per-class", type=int, default=80, help="tag faces (train crops) per tracked character")
    ap.add_argument("--posts", type=int, default=1200, help="synthetic posts, half for validation")
    ap.add_argument("--missed", type=float, default=0.15, help="share of posts whose tagged face was missed")
    ap.add_argument("--precision", type=float, default=0.97, help="precision a method's thresholds must reach")
    ap.add_argument("--neighbours", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--dims", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from labels.spreading import SPREAD_MIN_MARGIN, SPREAD_MIN_SCORE, SpreadConfig, spread, spread_with_posts
    from labels.weak import INFER_MIN_MARGIN, INFER_MIN_PROBABILITY
    from train.features import FeatureConfig, extract, load_images
    from train.model import Dataset, TrainConfig, predict, train

    rng, train_files, test_files = seeded_crops(args.seed)
    names = sorted(train_files)
    tracked = sorted(str(t) for t in rng.choice(names, size=args.tracked, replace=False))
    untracked = [n for n in names if n not in tracked]
    seeds = [(p, t) for t in tracked for p in sample(rng, train_files[t], args.per_class)]
    posts = mixed_posts(rng, test_files, tracked, untracked, args.posts, args.missed)
    half = len(posts) // 2
    parts = {"validation": posts[:half], "report": posts[half:]}
    paths = sorted({p for post in posts for p, _ in post["faces"]})
    print(
        f"tracked: {', '.join(tracked)}; {len(seeds)} tag faces; {len(posts)} posts ({args.missed:.0%} missed), "
        f"{len(paths)} distinct open faces",
        flush=True,
    )

    t0 = time.perf_counter()
    seed_images = load_images([p for p, _ in seeds], 96)
    open_images = load_images(paths, 96)
    labels = np.array([tracked.index(t) for _, t in seeds])
    classifier = train(Dataset(seed_images, labels, tracked), TrainConfig(backbone="none")).classifier
    model_p = dict(zip(paths, predict(classifier, open_images), strict=True))
    t_model = time.perf_counter() - t0

    t0 = time.perf_counter()
    config = FeatureConfig()
    x = np.concatenate([extract(seed_images, config), extract(open_images, config)])
    t_features = time.perf_counter() - t0
    t0 = time.perf_counter()
    spread_config = SpreadConfig(neighbours=args.neighbours, alpha=args.alpha, dims=args.dims)
    distribution = spread(x, np.concatenate([labels, -np.ones(len(paths), int)]), len(tracked), spread_config)
    spread_p = dict(zip(paths, distribution[len(seeds) :], strict=True))
    t_spread = time.perf_counter() - t0
    print(
        f"model (train + predict) {t_model:.0f}s; features {t_features:.0f}s; spreading {t_spread:.1f}s "
        f"(k={args.neighbours}, alpha={args.alpha}, dims={args.dims})",
        flush=True,
    )

    def scorer(table):
        return lambda path, tags: table[path][[tracked.index(t) for t in tags]]

    mean_p = {p: (model_p[p] + spread_p[p]) / 2 for p in paths}
    t0 = time.perf_counter()
    offset = len(seeds)
    row_of = {p: offset + i for i, p in enumerate(paths)}
    post_index = [([row_of[p] for p, _ in post["faces"]], [tracked.index(t) for t in post["tags"]]) for post in posts]
    prior = np.concatenate([np.eye(len(tracked))[labels], np.stack([model_p[p] for p in paths])])
    iterated = spread_with_posts(
        x, np.concatenate([labels, -np.ones(len(paths), int)]), len(tracked), post_index, prior, spread_config
    )
    iter_p = dict(zip(paths, iterated[offset:], strict=True))
    print(f"iterated spreading (2 rounds, with the model's probabilities) {time.perf_counter() - t0:.1f}s")
    results = {
        name: {part: pairs_for(ps, scorer(table)) for part, ps in parts.items()}
        for name, table in (("model", model_p), ("spreading", spread_p), ("mean", mean_p), ("iterated", iter_p))
    }

    def row(name: str, part: str, res, thresholds: str) -> str:
        made, right = stats(res)
        prec = right / made if made else float("nan")
        cover = right / resolvable(parts[part])
        faces = len({r[0] for post in res for r in post})
        return f"{name:<24} {thresholds:>11} {made:7d} {faces:7d} {prec:7.3f} {cover:7.3f}"

    report = resolvable(parts["report"])
    print(f"\n== {part_sizes(parts)}; resolvable faces (truly a tagged character): report {report} ==")
    print(f"{'method':<24} {'margin/score':>11} {'labels':>7} {'faces':>7} {'prec':>7} {'cover':>7}")
    chosen_results = {}
    production = {part: kept(results["model"][part], INFER_MIN_MARGIN, INFER_MIN_PROBABILITY) for part in parts}
    print(row("model, production thr.", "report", production["report"], f"{INFER_MIN_MARGIN}/{INFER_MIN_PROBABILITY}"))
    fixed = {part: kept(results["iterated"][part], SPREAD_MIN_MARGIN, SPREAD_MIN_SCORE) for part in parts}
    print(row("iterated, product thr.", "report", fixed["report"], f"{SPREAD_MIN_MARGIN}/{SPREAD_MIN_SCORE}"))
    for name in ("model", "spreading", "mean", "iterated"):
        picked = choose(results[name]["validation"], parts["validation"], args.precision)
        if picked is None:
            print(f"{name:<24} no thresholds reach precision {args.precision} on validation")
            continue
        chosen_results[name] = {part: kept(results[name][part], *picked) for part in parts}
        vmade, vright = stats(chosen_results[name]["validation"])
        print(
            row(f"{name} (chosen)", "report", chosen_results[name]["report"], f"{picked[0]:.1f}/{picked[1]:.1f}")
            + f"   validation prec {vright / max(vmade, 1):.3f}"
        )
    if "model" in chosen_results and "spreading" in chosen_results:
        merged = both(chosen_results["model"]["report"], chosen_results["spreading"]["report"])
        print(row("both (model + spreading)", "report", merged, "chosen"))
        model_faces = {(i, r[0]) for i, post in enumerate(chosen_results["model"]["report"]) for r in post}
        spread_faces = {(i, r[0]) for i, post in enumerate(chosen_results["spreading"]["report"]) for r in post}
        print(
            f"post faces labelled: model {len(model_faces)}, spreading {len(spread_faces)}, both "
            f"{len(model_faces & spread_faces)}, only spreading {len(spread_faces - model_faces)}, only model "
            f"{len(model_faces - spread_faces)}"
        )
        prod_faces = {(i, r[0]) for i, post in enumerate(production["report"]) for r in post}
        print(f"against production thresholds: model {len(prod_faces)}, union {len(prod_faces | spread_faces)}")
        merged_prod = both(production["report"], chosen_results["spreading"]["report"])
        print(row("production + spreading", "report", merged_prod, "prod/chosen"))


def part_sizes(parts) -> str:
    return ", ".join(f"{k} {len(v)} posts" for k, v in parts.items())


if __name__ == "__main__":
    main()
