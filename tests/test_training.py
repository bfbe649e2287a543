"""Training on the real 96x96 face crops of the test set (tests/support/testdata.py) with weights=none: the ensemble's
metrics, its parts, the unknown threshold, artifacts and reloading, the CNN's time-budget plan, the weights
setting (a local file, the cache, and the fallback when they cannot be had).

No test downloads anything: the pretrained path uses a weights file written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support.testdata import crop_counts, crop_dirs
from train.features import FeatureConfig, extract
from train.model import (
    UNKNOWN,
    WEIGHTS_SETTING,
    BackboneWeightsError,
    Dataset,
    TrainConfig,
    choose_weight,
    evaluate,
    fit_temperature,
    items_from_dir,
    load_artifacts,
    load_dataset,
    metrics_from_predictions,
    mobilenet_file_name,
    name_of,
    plan_cnn,
    predict,
    predict_labels,
    save_artifacts,
    sharpen,
    stratified_split,
    top_k,
    train,
    unknown_threshold,
)

TRAIN_COUNTS, TEST_COUNTS = crop_counts()  # from the registry: 30 and 6 per character
EPOCHS = 12


@pytest.fixture(scope="module")
def splits() -> tuple[Dataset, Dataset]:
    train_dir, test_dir = crop_dirs()  # no crops: every test here fails with the line saying how to get them
    train_set = load_dataset(items_from_dir(train_dir))
    test_set = load_dataset(items_from_dir(test_dir), train_set.class_names)
    return train_set, test_set


@pytest.fixture(scope="module")
def trained(splits: tuple[Dataset, Dataset]):
    train_set, _ = splits  # TensorFlow is a test dependency (make test installs the train extra): no skip
    return train(train_set, TrainConfig(weights="none", epochs=EPOCHS, threads=2, seed=0))


def test_dataset_from_the_crop_folders(splits: tuple[Dataset, Dataset]) -> None:
    train_set, test_set = splits
    assert train_set.class_names == ["nishikino_maki", "sakurauchi_riko", "takimoto_hifumi"]
    assert train_set.counts() == TRAIN_COUNTS
    n_test = sum(TEST_COUNTS.values())
    assert test_set.images.shape == (n_test, 96, 96, 3) and test_set.images.dtype == np.uint8
    tr, va = stratified_split(train_set.labels, 0.15, seed=0)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == sum(TRAIN_COUNTS.values())
    assert np.bincount(train_set.labels[va]).tolist() == [4, 4, 4]


def test_metrics_by_hand() -> None:
    m = metrics_from_predictions(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0]), ["a", "b", "c"])
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m.per_class["b"]["precision"] == pytest.approx(2 / 3) and m.per_class["b"]["recall"] == 1.0
    assert m.macro_f1 == pytest.approx(np.mean([0.5, 0.8, 2 / 3]))


def test_features_layout_and_colour(splits: tuple[Dataset, Dataset]) -> None:
    """HOG (1,764 dims at 64 px) + colour histograms over the whole face and a 4x4 grid (1,598 dims); hue
    moves only the colour block, a mirror image changes the HOG block."""
    faces = splits[0].images[:4]
    cfg = FeatureConfig()
    x = extract(faces, cfg)
    assert x.shape == (4, 1764 + 1598) and x.dtype == np.float32 and np.isfinite(x).all()
    swapped = extract(faces[..., ::-1].copy(), cfg)  # RGB -> BGR: same shapes and grey, other colours
    hog = slice(0, 1764)
    np.testing.assert_allclose(swapped[:, hog], x[:, hog], atol=0.02)  # grey weights differ slightly only
    assert np.abs(swapped[:, 1764:] - x[:, 1764:]).sum(1).min() > 1.0
    mirrored = extract(faces[:, :, ::-1].copy(), cfg)
    assert np.abs(mirrored[:, hog] - x[:, hog]).sum(1).min() > 1.0


def test_classical_alone_beats_chance_and_reloads(splits: tuple[Dataset, Dataset], tmp_path: Path) -> None:
    train_set, test_set = splits
    result = train(train_set, TrainConfig(backbone="none", weights="none"))
    clf = result.classifier
    assert clf.keras_model is None and clf.cnn_weight == 0.0 and result.epochs_run == 0
    p = predict(clf, test_set.images)
    assert (p.argmax(1) == test_set.labels).mean() >= 0.85  # measured 0.94 (17/18); chance is 1/3
    save_artifacts(clf, tmp_path)
    assert not (tmp_path / "model.keras").exists()
    np.testing.assert_allclose(predict(load_artifacts(tmp_path), test_set.images), p, rtol=0, atol=1e-6)


@pytest.mark.processes
def test_train_evaluate_save_reload(trained, splits: tuple[Dataset, Dataset], tmp_path: Path) -> None:
    _, test_set = splits
    clf = trained.classifier
    assert trained.epochs_run == EPOCHS and len(trained.history["loss"]) == EPOCHS
    assert trained.history["loss"][-1] < trained.history["loss"][0]  # the CNN fitted its training faces
    assert trained.train_counts == TRAIN_COUNTS
    # the plan kept the asked epochs and chose 64 px for 81 faces; recorded in the config
    assert clf.config.epochs == EPOCHS and clf.config.input_size == 64 == clf.cnn_size
    assert "81 CNN faces" in clf.config.plan and "64 px" in clf.config.plan

    metrics = evaluate(clf, test_set)
    n_test = sum(TEST_COUNTS.values())
    assert metrics.n == n_test and sum(map(sum, metrics.confusion)) == n_test
    assert metrics.accuracy >= 0.85 and metrics.macro_f1 >= 0.85  # measured 0.94 / 0.94 (17/18)
    assert set(metrics.per_class) == set(clf.class_names)
    cnn_alone = (clf.cnn_proba(test_set.images).argmax(1) == test_set.labels).mean()
    assert cnn_alone >= 0.6  # the CNN part learns on its own (measured 0.67-0.78); chance is 1/3

    # the ensemble's settings were chosen on the validation slice (9 faces) and recorded
    info = clf.info
    assert info["validation_faces"] == 9 and 0.0 <= clf.cnn_weight <= 1.0
    assert info["cnn_weight"] == clf.cnn_weight and 0.2 <= clf.temperature_cnn <= 5.0
    assert 1 / 3 < clf.threshold < 1.0 and info["threshold"] == clf.threshold
    assert info["threshold_by_percentile"]["5"] == pytest.approx(clf.threshold)
    assert "5th percentile" in info["threshold_rule"]
    assert metrics.unknown["threshold"] == clf.threshold and 0.0 <= metrics.unknown["share_unknown"] <= 0.3
    assert metrics.unknown["named_right"] + metrics.unknown["named_wrong"] + metrics.unknown["share_unknown"] == (
        pytest.approx(1.0)
    )

    out = save_artifacts(clf, tmp_path / "v1", metrics)
    for name in ("model.keras", "labels.json", "model.json", "metrics.json", "classical.npz"):
        assert (out / name).is_file(), name
    assert json.loads((out / "labels.json").read_text()) == clf.class_names
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["threshold"] == clf.threshold and manifest["cnn_weight"] == clf.cnn_weight

    reloaded = load_artifacts(out)
    assert reloaded.threshold == clf.threshold and reloaded.cnn_size == 64
    before, after = predict(clf, test_set.images), predict(reloaded, test_set.images)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)
    np.testing.assert_allclose(before.sum(1), 1.0, atol=1e-5)
    assert evaluate(reloaded, test_set).accuracy == metrics.accuracy

    # paths work as well as arrays; top-k is ordered by probability, names from the model's classes
    paths = [p for p, _ in items_from_dir(crop_dirs()[1])][:2]
    np.testing.assert_allclose(predict(reloaded, paths), after[:2], rtol=0, atol=1e-5)
    best = top_k(reloaded, after[:2], k=3)
    for row, ranked in zip(after[:2], best, strict=True):
        assert [name for name, _ in ranked] == [clf.class_names[i] for i in np.argsort(-row)]
        assert [p for _, p in ranked] == sorted(row.tolist(), reverse=True)


def test_unknown_rule() -> None:
    """Threshold = percentile of the best probability over correctly named faces; under it: unknown."""
    proba = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]])
    labels = np.array([0, 0, 1, 1, 2])  # the fourth face is named wrong: its 0.5 does not count
    assert unknown_threshold(proba, labels, 0) == pytest.approx(0.6)
    assert unknown_threshold(proba, labels, 50) == pytest.approx(np.percentile([0.9, 0.6, 0.7, 0.8], 50))
    from train.model import Classifier

    clf = Classifier(["a", "b", "c"], TrainConfig(), threshold=0.65)
    assert predict_labels(clf, proba).tolist() == [0, -1, 1, -1, 2]
    assert [name_of(clf, row) for row in proba] == ["a", UNKNOWN, "b", UNKNOWN, "c"]


def test_ensemble_weight_and_temperature() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    right = np.full((60, 3), 0.1)
    right[np.arange(60), labels] = 0.8
    wrong = np.full((60, 3), 0.1)
    wrong[np.arange(60), (labels + 1) % 3] = 0.8
    assert choose_weight(right, wrong, labels) == 1.0  # the right model alone: best accuracy and log-loss
    assert choose_weight(wrong, right, labels) == 0.0
    # a model right 80% of the time at probability 0.8 is calibrated: its temperature stays near 1
    mostly = np.where(rng.random((60, 1)) < 0.8, right, wrong)
    assert 0.7 < fit_temperature(mostly, labels) < 1.4
    soft = sharpen(mostly, 3.0)  # softened three times: the fitted temperature undoes it
    assert fit_temperature(soft, labels) == pytest.approx(1 / 3, rel=0.15)


def test_cnn_plan_follows_the_number_of_faces() -> None:
    """<= 3 minutes at 3,000 faces: 64 px / 15 epochs while it fits the budget, then 48 px, fewer epochs."""
    assert plan_cnn(300, 100)[:2] == (64, 15)  # 50 s at 90 faces/s
    assert plan_cnn(2700, 100)[:2] == (48, 6)  # 3,000 faces less the validation slice: 90 s at 180 faces/s
    assert plan_cnn(20000, 100)[:2] == (48, 3)  # never fewer than 3 epochs
    assert plan_cnn(2700, 0)[:2] == (64, 15)  # no budget: the full design
    assert plan_cnn(2700, 100, epochs=20)[:2] == (48, 20)  # asked epochs are kept
    cfg = TrainConfig(cnn_budget_s=100).resolved(2700)
    assert (cfg.input_size, cfg.epochs) == (48, 6) and "estimated 90s" in cfg.plan


@pytest.mark.processes
def test_pretrained_weights_from_the_cache_are_used_and_compared(
    splits: tuple[Dataset, Dataset], tmp_path: Path
) -> None:
    """weights=imagenet with the file already in <cache>/models: loaded from there (no download), the
    pretrained and the from-scratch CNN are both trained and the better one on validation is kept."""
    import keras

    from train.model import build_model

    train_set, _ = splits
    cache = tmp_path / "keras"
    weights = cache / "models" / mobilenet_file_name(0.35, 96)
    weights.parent.mkdir(parents=True)
    source = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, include_top=False, weights=None)
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(weights, "w") as f:  # the legacy .h5 layout of Keras' own ImageNet files
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    # the file's weights are the backbone's (review: a silently ignored file would pass a shape check)
    model = build_model(3, "mobilenetv2", 96, str(weights))
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    assert not base.trainable
    for mine, theirs in zip(base.get_weights()[:5] + base.get_weights()[-3:],
                            source.get_weights()[:5] + source.get_weights()[-3:], strict=True):  # fmt: skip
        np.testing.assert_array_equal(mine, theirs)

    small = Dataset(train_set.images[::3], train_set.labels[::3], train_set.class_names)
    config = TrainConfig(weights="imagenet", cache_dir=str(cache), epochs=2, head_epochs=1, fine_tune_epochs=1,
                         threads=2, validation_fraction=0.3)  # fmt: skip
    result = train(small, config)
    assert result.weights_note == f"ImageNet weights from the cache {weights}"
    compared = result.classifier.info["compared"]
    assert set(compared) == {"mobilenetv2", "resnet"}
    kept = result.classifier.cnn_backbone
    other = ({"mobilenetv2", "resnet"} - {kept}).pop()
    assert (compared[kept]["validation_accuracy"], -compared[kept]["validation_log_loss"]) >= (
        compared[other]["validation_accuracy"],
        -compared[other]["validation_log_loss"],
    )
    assert result.pretrained_used == (kept == "mobilenetv2")
    assert result.history["phase"] == (["head", "fine_tune"] if kept == "mobilenetv2" else ["scratch"] * 2)
    assert predict(result.classifier, small.images[:2]).shape == (2, 3)


@pytest.mark.processes
def test_unavailable_weights_fall_back_to_scratch(splits: tuple[Dataset, Dataset], tmp_path: Path) -> None:
    """A weights file that does not exist never fails the retrain: weights=none, with the reason."""
    train_set, _ = splits
    missing = tmp_path / "nope.h5"
    small = Dataset(train_set.images[::3], train_set.labels[::3], train_set.class_names)
    result = train(small, TrainConfig(weights=str(missing), epochs=1, threads=2))
    assert result.weights_note == f"{WEIGHTS_SETTING}={str(missing)!r}: no such weights file; trained with weights=none"
    assert not result.pretrained_used and result.classifier.cnn_backbone == "resnet"
    assert "compared" not in result.classifier.info
    assert result.classifier.info["weights"]["note"] == result.weights_note


def test_missing_weights_file_names_the_setting(tmp_path: Path) -> None:
    from train.model import build_model

    with pytest.raises(BackboneWeightsError, match=WEIGHTS_SETTING):
        build_model(3, "mobilenetv2", 64, str(tmp_path / "nope.h5"))
