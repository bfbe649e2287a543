"""The self-training loop (train.selftrain's rule) on holoen-faces, where the truth is known.

`--tracked` characters; of each one's train crops, `--tag-share` are single-face `tag` posts and the rest
are paired into two-character posts (two faces, both characters tagged: ambiguous). Round 0 trains on the
tag faces; each round infers labels for the pairs with the rule labels.weak uses (labels.rules.
inferred_pairs, margin 0.4, probability 0.6) and retrains on tag + inferred labels, while the inferred set
changes by at least `--min-change` and at most `--rounds` follow-ups. Reported per round: accuracy on every
holoen test crop of the tracked characters, inferred labels (and how many are right), labels changed, seconds;
and the same model trained on every label (the ceiling). The classical model alone by default (fast); `--cnn`
trains the whole ensemble (weights=none, `--epochs`). Usage::

    WAIFU_TEST_DATA=/work/shared/data .venv/bin/python -m bench.selftrain_loop [--tracked 8] [--cnn]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.holoen import seeded_crops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tracked", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=120)
    parser.add_argument("--tag-share", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-change", type=float, default=0.05)
    parser.add_argument("--cnn", action="store_true")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from labels.rules import inferred_pairs
    from labels.weak import INFER_MIN_MARGIN, INFER_MIN_PROBABILITY
    from train.features import load_images
    from train.model import Dataset, TrainConfig, evaluate, load_dataset, predict, train
    from train.selftrain import inferred_change

    rng, train_files, test_files = seeded_crops(args.seed)
    tracked = sorted(rng.choice(sorted(train_files), size=args.tracked, replace=False).tolist())
    tag: list[tuple[str, str]] = []
    pool: list[tuple[str, str]] = []
    for c in tracked:
        chosen = [str(train_files[c][i]) for i in rng.permutation(len(train_files[c]))[: args.per_class]]
        n_tag = max(2, round(args.tag_share * len(chosen)))
        tag += [(p, c) for p in chosen[:n_tag]]
        pool += [(p, c) for p in chosen[n_tag:]]
    # two-character posts: faces of different characters paired at random
    order = rng.permutation(len(pool))
    posts, waiting = [], [pool[i] for i in order]
    while len(waiting) >= 2:
        a = waiting.pop()
        j = next((k for k in range(len(waiting) - 1, -1, -1) if waiting[k][1] != a[1]), None)
        if j is None:
            break
        posts.append([a, waiting.pop(j)])
    faces = [f for post in posts for f in post]
    face_images = load_images([p for p, _ in faces], 96)
    test = load_dataset([(p, c) for c in tracked for p in test_files[c]], tracked)
    config = (
        TrainConfig.recommended("none", epochs=args.epochs) if args.cnn else TrainConfig(backbone="none", threads=2)
    )
    tag_images = load_images([p for p, _ in tag], 96)
    tag_labels = np.array([tracked.index(c) for _, c in tag])

    def fit(images: np.ndarray, labels: np.ndarray):
        return train(Dataset(images, labels, tracked), config).classifier

    kind = f"ensemble, {args.epochs} epochs" if args.cnn else "classical"
    print(f"{len(tracked)} characters ({', '.join(tracked)}); {len(tag)} tag faces, {len(posts)} two-character "
          f"posts ({len(faces)} faces); {kind}")  # fmt: skip
    start = time.perf_counter()
    truth = np.array([tracked.index(c) for _, c in faces])
    ceiling = fit(np.concatenate([tag_images, face_images]), np.concatenate([tag_labels, truth]))
    print(f"all labels: accuracy {evaluate(ceiling, test).accuracy:.3f} ({time.perf_counter() - start:.0f}s)")

    inferred: dict[int, int] = {}  # face index -> class
    for round_ in range(args.rounds + 1):
        start = time.perf_counter()
        ids = sorted(inferred)
        images = np.concatenate([tag_images, face_images[ids]]) if ids else tag_images
        labels = np.concatenate([tag_labels, [inferred[i] for i in ids]]).astype(np.int64)
        model = fit(images, labels)
        accuracy = evaluate(model, test).accuracy
        p = predict(model, face_images)
        new: dict[int, int] = {}
        for k, post in enumerate(posts):
            chars = sorted({tracked.index(c) for _, c in post})
            rows = [2 * k, 2 * k + 1]
            scores = p[np.ix_(rows, chars)]
            for face, char, _ in inferred_pairs(scores, INFER_MIN_MARGIN, INFER_MIN_PROBABILITY):
                new[rows[face]] = chars[char]
        counts = {
            "inferred": len(new),
            "new": sum(i not in inferred for i in new),
            "relabelled": sum(i in inferred and inferred[i] != c for i, c in new.items()),
            "reverted": sum(i not in new for i in inferred),
        }
        changed, share = inferred_change(counts)
        right = sum(tracked[c] == faces[i][1] for i, c in new.items())
        # the ensemble's CNN share, chosen on validation: 0 means the round was the classical model alone
        print(f"round {round_}: trained on {len(ids)} inferred; CNN weight {model.cnn_weight:.2f}; "
              f"accuracy {accuracy:.3f}; then inferred {len(new)} "
              f"({right} right, {right / max(1, len(new)):.1%}), changed {changed} ({share:.1%}) "
              f"({time.perf_counter() - start:.0f}s)")  # fmt: skip
        inferred = new
        if share < args.min_change or changed == 0:
            print("steady: the loop stops")
            break


if __name__ == "__main__":
    main()
