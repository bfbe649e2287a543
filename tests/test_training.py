"""Training on the real 96x96 face crops of the test set (tests/testdata.py) with weights=none: metrics,
artifacts, reloading, the weights setting.

No test downloads weights: the pretrained path is exercised with a local weights file written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.testdata import crop_counts, crop_dirs
from train.features import ClassicalConfig, ClassicalModel, fit_classical
from train.model import (
    WEIGHTS_SETTING,
    BackboneWeightsError,
    Dataset,
    TrainConfig,
    evaluate,
    items_from_dir,
    load_artifacts,
    load_dataset,
    metrics_from_predictions,
    predict,
    save_artifacts,
    stratified_split,
    top_k,
    train,
)

CHANCE = 1 / 3
TRAIN_COUNTS, TEST_COUNTS = crop_counts()  # from the registry: 30 and 6 per character


@pytest.fixture(scope="module")
def splits() -> tuple[Dataset, Dataset]:
    train_dir, test_dir = crop_dirs()  # no crops: every test here fails with the line saying how to get them
    train_set = load_dataset(items_from_dir(train_dir))
    test_set = load_dataset(items_from_dir(test_dir), train_set.class_names)
    return train_set, test_set


@pytest.fixture(scope="module")
def trained(splits: tuple[Dataset, Dataset]):  # noqa: ANN201 - TrainResult, imported above
    train_set, _ = splits  # TensorFlow is a test dependency (make test installs the train extra): no skip
    # the chosen design (small CNN + classical ensemble) from scratch, short: the test checks plumbing
    config = TrainConfig(backbone="smallcnn", weights="none", epochs=12, patience=12, threads=1, seed=0)
    return train(train_set, config)


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


def test_classical_beats_chance_and_reloads(splits: tuple[Dataset, Dataset], tmp_path: Path) -> None:
    train_set, test_set = splits
    model = fit_classical(train_set.images, train_set.labels, 3, ClassicalConfig())
    p = model.predict_proba(test_set.images)
    assert (p.argmax(1) == test_set.labels).mean() >= 0.8  # measured 0.94; far above chance
    model.save(tmp_path)
    np.testing.assert_array_equal(ClassicalModel.load(tmp_path).predict_proba(test_set.images), p)


@pytest.mark.slow
def test_train_evaluate_save_reload(trained, splits: tuple[Dataset, Dataset], tmp_path: Path) -> None:  # noqa: ANN001
    _, test_set = splits
    clf = trained.classifier
    assert trained.epochs_run > 0 and "loss" in trained.history and "val_loss" in trained.history
    assert trained.train_counts == TRAIN_COUNTS

    metrics = evaluate(clf, test_set)
    n_test = sum(TEST_COUNTS.values())
    assert metrics.n == n_test and sum(map(sum, metrics.confusion)) == n_test
    assert metrics.accuracy > CHANCE and metrics.macro_f1 > CHANCE
    assert set(metrics.per_class) == set(clf.class_names)
    assert all({"precision", "recall", "f1", "support"} <= set(v) for v in metrics.per_class.values())
    cnn_alone = (clf.cnn_proba(test_set.images).argmax(1) == test_set.labels).mean()
    assert cnn_alone > CHANCE  # the CNN part learns something on its own, not only the classical part

    out = save_artifacts(clf, tmp_path / "v1", metrics)
    for name in ("model.keras", "labels.json", "model.json", "metrics.json", "classical.npz", "classical.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "labels.json").read_text()) == clf.class_names

    reloaded = load_artifacts(out)
    before, after = predict(clf, test_set.images), predict(reloaded, test_set.images)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-6)
    np.testing.assert_allclose(before.sum(1), 1.0, atol=1e-5)
    assert evaluate(reloaded, test_set).accuracy == metrics.accuracy

    # paths work as well as arrays; top-k names come from the model's classes
    paths = [p for p, _ in items_from_dir(crop_dirs()[1])][:2]
    np.testing.assert_allclose(predict(reloaded, paths), after[:2], rtol=0, atol=1e-6)
    best = top_k(reloaded, after[:2], k=3)
    assert [name for name, _ in best[0]][0] in clf.class_names and len(best[0]) == 3


@pytest.mark.slow
def test_pretrained_path_from_local_file(splits: tuple[Dataset, Dataset], tmp_path: Path) -> None:
    """weights=<file>: frozen backbone, then fine-tuning, without any download."""
    import keras
    train_set, _ = splits
    weights = tmp_path / "mobilenetv2_notop.weights.h5"
    keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, include_top=False, weights=None).save_weights(
        weights
    )
    small = Dataset(train_set.images[::5], train_set.labels[::5], train_set.class_names)
    config = TrainConfig(
        backbone="mobilenetv2", weights=str(weights), input_size=64, epochs=1, fine_tune_epochs=1, threads=1,
        classical_weight=0.0,
    )  # fmt: skip
    result = train(small, config)
    assert result.history["phase"] == ["head", "fine_tune"]
    assert result.classifier.predict_proba(small.images[:2]).shape == (2, 3)


def test_missing_weights_file_names_the_setting(tmp_path: Path) -> None:
    from train.model import build_model

    with pytest.raises(BackboneWeightsError, match=WEIGHTS_SETTING):
        build_model(3, "mobilenetv2", 64, str(tmp_path / "nope.h5"))
