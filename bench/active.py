"""What a person's 50 labels are worth: faces chosen "most useful first" (labels.priority, the faces page's
order) against faces chosen at random, on holoen-faces where the truth is known. Usage::

    WAIFU_TEST_DATA=/work/shared/data .venv/bin/python -m bench.active [--seeds 5] [--budget 50]

A collection as the service holds it after a retrain, per seed: `--tracked` characters with few and
uneven `tag` faces (`--counts`, shuffled over the characters; `--wrong` of them someone else's face),
and synthetic posts from the other train crops (one or two tracked characters tagged, 1-3 untracked faces
beside them, `--missed` of the posts without the tagged face) whose faces are ambiguous. As the retrain
does: tag labels a model trained without them calls someone else are doubtful (labels.weak, left out of
training); a model on the other tag labels suggests a character for every ambiguous face and infers
labels (labels.rules.inferred_pairs, production thresholds); the next model trains on tag + inferred labels.
The model is the classical part (train.features: HOG + colour histograms, logistic regression), for speed.

A simulated person then takes `--budget` faces in one order and gives each its true character (a manual
label), or rejects it when it is no tracked character. The gain is the next model's accuracy on the tracked
characters' holoen *test* crops minus the accuracy without the person. Orders: `useful`
(labels.priority.usefulness), `uncertain` (the same without rarity and the post's tags), `doubt-first`
(`useful`, but the doubtful tag labels first, by doubt), `random` (any face the page shows: tag, inferred,
ambiguous) and `random-open` (any ambiguous, inferred or doubtful face). Per order: the faces that became
labels and the picks as doubtful tag / inferred / ambiguous faces.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.holoen import files, holoen_root

ORDERS = ("useful", "uncertain", "doubt-first", "random", "random-open")


def build(rng, train_files, tracked, untracked, counts, wrong, posts, missed):
    """(faces, post list): each face a dict (path, truth, source, label); posts as (face indices, tags)."""
    pools = {n: list(rng.permutation(len(train_files[n]))) for n in train_files}

    def take(name):
        return train_files[name][pools[name].pop()] if pools[name] else None

    faces, post_list = [], []
    for t, n in zip(tracked, counts, strict=True):
        for _ in range(n):
            if rng.random() < wrong:  # the one detected face is someone else's
                other = str(rng.choice([x for x in train_files if x != t]))
                path, truth = take(other), other
            else:
                path, truth = take(t), t
            if path is not None:
                faces.append({"path": path, "truth": truth, "source": "tag", "label": t})
    for i in range(posts):
        tags = [str(x) for x in rng.choice(tracked, size=1 + i % 2, replace=False)]
        members = [(t, take(t)) for t in tags]
        if rng.random() < missed:
            members = members[1:]
        members += [(u, take(u)) for u in rng.choice(untracked, size=int(rng.integers(1, 4)), replace=False)]
        members = [(t, p) for t, p in members if p is not None]
        if len(members) < 2:
            continue
        index = []
        for truth, path in members:
            index.append(len(faces))
            faces.append({"path": path, "truth": truth, "source": "ambiguous", "label": None})
        post_list.append((index, tags))
    return faces, post_list


def accuracy(x, y, x_test, y_test, k) -> float:
    from train.features import fit_linear

    model = fit_linear(x, y, k, 0.03)
    return float((model.logits(x_test).argmax(1) == y_test).mean())


def run_seed(args, holo, seed: int) -> dict[str, float]:
    from labels.priority import usefulness
    from labels.rules import inferred_pairs
    from labels.weak import DOUBT_MIN_PROBABILITY, INFER_MIN_MARGIN, INFER_MIN_PROBABILITY
    from train.features import FeatureConfig, extract, fit_linear, load_images, softmax
    from train.weak_inputs import doubt_probabilities

    rng = np.random.default_rng(seed)
    train_files, test_files = files(holo, "train"), files(holo, "test")
    names = sorted(train_files)
    tracked = sorted(str(t) for t in rng.choice(names, size=args.tracked, replace=False))
    untracked = [n for n in names if n not in tracked]
    counts = [int(c) for c in rng.permutation([int(c) for c in args.counts.split(",")])]
    faces, posts = build(rng, train_files, tracked, untracked, counts, args.wrong, args.posts, args.missed)
    k, index = len(tracked), {t: i for i, t in enumerate(tracked)}
    config = FeatureConfig()
    x = extract(load_images([f["path"] for f in faces], 96), config)
    test = [(p, index[t]) for t in tracked for p in test_files[t]]
    x_test = extract(load_images([p for p, _ in test], 96), config)
    y_test = np.array([y for _, y in test])

    # the retrain: doubt the tag labels, fit on the rest, suggest and infer, the next model's training set
    tag_rows = [i for i, f in enumerate(faces) if f["source"] == "tag"]
    y_tag = np.array([index[faces[i]["label"]] for i in tag_rows])
    oof, _ = doubt_probabilities(x[tag_rows], y_tag, np.arange(len(tag_rows)), k)
    for i, p, y in zip(tag_rows, oof, y_tag, strict=True):
        best = int(p.argmax())
        faces[i]["doubt"] = float(p[best]) if best != y and p[best] >= DOUBT_MIN_PROBABILITY else None
    clean = [i for i in tag_rows if faces[i]["doubt"] is None]
    model = fit_linear(x[clean], np.array([index[faces[i]["label"]] for i in clean]), k, 0.03)
    prob = softmax(model.logits(x))
    for i, f in enumerate(faces):
        f["suggestion"], f["score"] = tracked[int(prob[i].argmax())], float(prob[i].max())
    for ids, tags in posts:
        scores = prob[np.ix_(ids, [index[t] for t in tags])]
        for face, c, margin in inferred_pairs(scores, INFER_MIN_MARGIN, INFER_MIN_PROBABILITY):
            f = faces[ids[face]]
            f["source"], f["label"], f["margin"] = "inferred", tags[c], float(margin)
    post_of = {i: tags for ids, tags in posts for i in ids}

    def training(labels: dict[int, str | None]) -> tuple[np.ndarray, np.ndarray]:
        """Rows the next retrain trains on: clean tag and inferred labels, with the person's word over them."""
        rows, ys = [], []
        for i, f in enumerate(faces):
            label = labels[i] if i in labels else (f["label"] if f["source"] == "inferred" or i in clean else None)
            if label is not None:
                rows.append(i)
                ys.append(index[label])
        return np.array(rows), np.array(ys)

    rows, ys = training({})
    base = accuracy(x[rows], ys, x_test, y_test, k)
    labelled = {t: int((ys == index[t]).sum()) for t in tracked}
    n_inferred = sum(f["source"] == "inferred" for f in faces)
    wrong_inferred = sum(f["source"] == "inferred" and f["label"] != f["truth"] for f in faces)

    def value(i: int, rare: bool) -> float:
        f = faces[i]
        character = f["label"] if f["source"] != "ambiguous" else f["suggestion"]
        if rare == "doubt-first" and f.get("doubt") is not None:  # the doubtful tag labels before all else
            return 1.0 + f["doubt"]
        return usefulness(
            f["source"],
            f["score"],
            f.get("margin"),
            f.get("doubt"),
            labelled.get(character, 0) if rare else 0,
            f["suggestion"] in post_of.get(i, [f["suggestion"]]) if rare else True,
        )

    shown = list(range(len(faces)))
    open_faces = [i for i, f in enumerate(faces) if f["source"] != "tag" or f["doubt"] is not None]
    picks = {
        "useful": sorted(shown, key=lambda i: (-value(i, True), i))[: args.budget],
        "uncertain": sorted(shown, key=lambda i: (-value(i, False), i))[: args.budget],
        "doubt-first": sorted(shown, key=lambda i: (-value(i, "doubt-first"), i))[: args.budget],
        "random": [int(i) for i in rng.choice(shown, size=args.budget, replace=False)],
        "random-open": [int(i) for i in rng.choice(open_faces, size=args.budget, replace=False)],
    }
    out = {"base": base, "inferred": n_inferred, "wrong_inferred": wrong_inferred}
    for order, chosen in picks.items():
        person = {i: (faces[i]["truth"] if faces[i]["truth"] in index else None) for i in chosen}
        rows, ys = training(person)
        out[order] = accuracy(x[rows], ys, x_test, y_test, k) - base
        out[f"{order}-useful-labels"] = sum(v is not None for v in person.values())
        out[f"{order}-kinds"] = "/".join(
            str(
                sum(
                    (faces[i].get("doubt") is not None) == (kind == "doubtful") and faces[i]["source"] == source
                    for i in chosen
                )
            )
            for kind, source in (("doubtful", "tag"), ("", "inferred"), ("", "ambiguous"))
        )
    out["faces"], out["doubtful"] = len(faces), sum(f.get("doubt") is not None for f in faces)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tracked", type=int, default=8)
    ap.add_argument("--counts", default="4,6,8,12,20,30,45,60", help="tag faces per tracked character")
    ap.add_argument("--wrong", type=float, default=0.1, help="share of tag faces that are someone else")
    ap.add_argument("--posts", type=int, default=400, help="ambiguous posts")
    ap.add_argument("--missed", type=float, default=0.15)
    ap.add_argument("--budget", type=int, default=50, help="faces the person labels")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    args = ap.parse_args()
    holo = holoen_root()
    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        t0 = time.perf_counter()
        r = run_seed(args, holo, seed)
        results.append(r)
        print(
            f"seed {seed}: {r['faces']} faces ({r['doubtful']} doubtful tag, {r['inferred']} inferred of which "
            f"{r['wrong_inferred']} wrong); accuracy without the person {r['base']:.3f}; gain "
            + ", ".join(f"{o} {r[o]:+.3f} ({r[o + '-useful-labels']} labels, {r[o + '-kinds']})" for o in ORDERS)
            + f"  [{time.perf_counter() - t0:.0f}s]",
            flush=True,
        )
    print(f"\n== {args.seeds} seeds, {args.budget} faces labelled: accuracy gain, mean ± sd (min..max) ==")
    for order in ORDERS:
        g = np.array([r[order] for r in results])
        n = np.array([r[order + "-useful-labels"] for r in results])
        print(
            f"{order:<12} {g.mean():+.4f} ± {g.std(ddof=1) if len(g) > 1 else 0:.4f} "
            f"({g.min():+.3f}..{g.max():+.3f}); faces that became labels {n.mean():.1f}"
        )
    base = np.array([r["base"] for r in results])
    print(f"accuracy without the person: {base.mean():.4f} ± {base.std(ddof=1) if len(base) > 1 else 0:.4f}")


if __name__ == "__main__":
    main()
