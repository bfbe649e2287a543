"""A character with few labelled faces, before and after issue 19 part 3, on holoen-faces.

The case the issue saw: a character with 14 labelled faces, 9 of them put in test by the hash split and 5
left for training. The stratified split (labels.splits) gives it 12 training faces and 2 test faces; the
class-balanced loss (train.model.data.class_weights) then weighs them up. Each variant trains the whole
ensemble (weights=none, `--epochs`) on `--per-class` train crops of `--others` other characters plus the
small character's faces, and reports the small character's recall and F1 on all of its holoen test crops
(a fixed set, larger than its own split, so that the figure is not one of 2 faces) and the accuracy over
every character's test crops. One run, 2 cores. Usage::

    WAIFU_TEST_DATA=/work/shared/data .venv/bin/python -m bench.small_class [--small mumei] [--epochs 8]
"""

from __future__ import annotations

import argparse
import time

from bench.holoen import sample, seeded_crops


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", default="mumei")
    parser.add_argument("--others", type=int, default=7)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from train.model import TrainConfig, evaluate, load_dataset, train

    rng, train_files, test_files = seeded_crops(args.seed)
    others = [c for c in sorted(train_files) if c != args.small][: args.others]
    base = [(p, c) for c in others for p in sample(rng, train_files[c], args.per_class)]
    fourteen = sample(rng, train_files[args.small], 14)
    classes = sorted([*others, args.small])
    test = load_dataset([(p, c) for c in classes for p in test_files[c]], classes)
    variants = [
        ("hash split: 5 train faces, unweighted", 5, 1.0),
        ("stratified: 12 train faces, unweighted", 12, 1.0),
        ("stratified: 12 train faces, class weights (cap 10)", 12, 10.0),
    ]
    print(f"small character {args.small}: {len(test_files[args.small])} test crops; {len(others)} others x "
          f"{args.per_class} train faces; epochs {args.epochs}")  # fmt: skip
    for name, n, cap in variants:
        start = time.perf_counter()
        data = load_dataset(base + [(p, args.small) for p in fourteen[:n]], classes)
        config = TrainConfig.recommended("none", epochs=args.epochs, class_weight_cap=cap)
        metrics = evaluate(train(data, config).classifier, test)
        small = metrics.per_class[args.small]
        print(f"{name:52s} recall {small['recall']:.3f}  F1 {small['f1']:.3f}  accuracy {metrics.accuracy:.3f}  "
              f"({time.perf_counter() - start:.0f}s)")  # fmt: skip


if __name__ == "__main__":
    main()
