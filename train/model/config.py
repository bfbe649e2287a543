"""The classifier's hyperparameters (TrainConfig), file names and the CNN plan for a number of faces."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from train.features import FeatureConfig

BACKBONES = ("resnet", "mobilenetv2", "none")  # "none": the classical model alone
FORMAT = 2
KERAS_FILE = "model.keras"
LINEAR_FILE = "classical.npz"
LABELS_FILE = "labels.json"
MANIFEST_FILE = "model.json"
WEIGHTS_SETTING = "WAIFU_BACKBONE_WEIGHTS"
UNKNOWN = "unknown"
# Keras' defaults (0.99, MobileNetV2 0.999) need thousands of steps before the moving statistics fit the
# data; a few thousand faces give a few hundred steps
BN_MOMENTUM = 0.9
# training throughput of the from-scratch ResNet on 2 CPU cores, faces x epochs per second
# (bench/recognition/FINDINGS.md): what plan_cnn() sizes the CNN with
FACES_PER_S = {64: 90.0, 48: 180.0}
MAX_EPOCHS = 15  # the full design; more was not measured
MIN_EPOCHS = 3
MOBILENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation: an offline machine fails in well under a second


class BackboneWeightsError(RuntimeError):
    """ImageNet weights could not be had (offline, bad file): names the setting to change."""


@dataclass
class TrainConfig:
    """Hyperparameters; recorded with every model version (after :meth:`resolved` filled in the CNN plan)."""

    backbone: str = "resnet"  # one of BACKBONES
    weights: str = "none"  # "imagenet" | "none" | path to a local no-top MobileNetV2 weights file
    input_size: int | None = None  # CNN input side; None = from the number of faces (plan_cnn)
    epochs: int | None = None  # CNN epochs; None = from the number of faces (plan_cnn)
    cnn_budget_s: float = 100.0  # CNN training seconds plan_cnn aims at (2 cores); 0 = the full design
    batch_size: int = 64
    learning_rate: float = 2e-3  # peak, after a linear warm-up; then cosine decay to zero
    warmup_epochs: int = 1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    # class-balanced loss (CNN and classical part): a small class weighs up to this many times a big one's
    # face (train.model.data.class_weights); 1 = unweighted
    class_weight_cap: float = 10.0
    dropout: float = 0.2
    stem: int = 24
    widths: tuple[int, ...] = (32, 64, 128, 256)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    crop_area: float = 0.6  # random crops keep 60-100% of the face's area
    jitter: float = 0.2  # brightness/contrast +-20%
    saturation: float = 0.2  # saturation +-20%; hue is never changed
    # pretrained MobileNetV2 (only when weights can be had)
    width: float = 0.35  # alpha; the ImageNet files exist for 0.35, 0.5, 0.75, 1.0, 1.3, 1.4
    pretrained_size: int = 96
    head_epochs: int = 3
    fine_tune_epochs: int = 5
    fine_tune_layers: int = 30  # backbone layers (from the top) unfrozen when fine-tuning
    fine_tune_learning_rate: float = 2e-4
    compare_scratch: bool = True  # with weights available, also train the from-scratch CNN and keep the better
    # classical part and ensemble
    features: FeatureConfig = field(default_factory=FeatureConfig)
    C: float = 0.03
    flip_train: bool = True
    validation_fraction: float = 0.1
    cnn_weight: float | None = None  # fixed CNN share of the average; None = chosen on validation
    unknown_percentile: float = 5.0
    seed: int = 0
    threads: int | None = 2  # TensorFlow intra-op threads (inter-op 1): the service has 2 cores
    tta: bool = True
    cache_dir: str | None = None  # where ImageNet weights are downloaded to / looked for
    weights_url: str = MOBILENET_URL  # where the ImageNet no-top files are downloaded from
    weights_retry_s: float = 86400.0  # after a failed download, no new attempt for this long (process and disk)
    plan: str = ""  # how input_size/epochs were chosen (filled by resolved())

    @classmethod
    def recommended(cls, weights: str = "none", **overrides: Any) -> TrainConfig:
        """The chosen design for a weights setting (the CNN plan is made from the data in train())."""
        return cls(**{"weights": weights or "none", **overrides})

    def resolved(self, n_cnn: int) -> TrainConfig:
        """A copy with the CNN's input size and epochs filled in for `n_cnn` training faces."""
        size, epochs, plan = plan_cnn(n_cnn, self.cnn_budget_s, self.input_size, self.epochs)
        return replace(self, input_size=size, epochs=epochs, plan=plan)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        raw = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        for key in ("widths", "blocks"):
            if key in raw:
                raw[key] = tuple(raw[key])
        features = FeatureConfig(**raw.pop("features", {}))
        return cls(features=features, **raw)


def plan_cnn(n: int, budget_s: float, size: int | None = None, epochs: int | None = None) -> tuple[int, int, str]:
    """(input side, epochs, why) for the from-scratch CNN on `n` faces within `budget_s` seconds.

    64 px for 15 epochs when that fits (FACES_PER_S); otherwise 48 px (about twice as fast, 1-2 points
    less) with as many epochs as fit, 3 at least (past that, time grows with the data rather than the
    model shrinking further). A given size or epochs is kept; 0 budget = the full design."""
    n = max(1, n)

    def cost(s: int, e: int) -> float:
        return n * e / FACES_PER_S.get(s, FACES_PER_S[64] * (64 / s) ** 2)

    if budget_s <= 0:
        s, e = size or 64, epochs or MAX_EPOCHS
        return s, e, f"full design: {s} px, {e} epochs (no time budget), estimated {cost(s, e):.0f}s"
    if size is None:
        size = 64 if cost(64, epochs or MAX_EPOCHS) <= budget_s else 48
    if epochs is None:
        fit = int(budget_s * FACES_PER_S.get(size, FACES_PER_S[64] * (64 / size) ** 2) / n)
        epochs = max(MIN_EPOCHS, min(MAX_EPOCHS, fit))
    why = (
        f"{n} CNN faces, budget {budget_s:.0f}s at {FACES_PER_S.get(size, 0):.0f} faces/s ({size} px): "
        f"{size} px, {epochs} epochs, estimated {cost(size, epochs):.0f}s"
    )
    return size, epochs, why
