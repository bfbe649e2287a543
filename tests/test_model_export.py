"""`waifu model export`: a model trained on the real crops (weights=none), exported by the CLI, then loaded
in a fresh Python process that cannot import this project (plain onnxruntime; plain Keras on the
SavedModel), which must name every face of the held-out pictures as `waifu predict` does.

Held out: the set's 18 test crops (the retrain trains on the train split only) and its 21 illustrations
lbpcascade missed in the notebook (so none of the notebook's crops came from them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import json_lines, run_cli_blocking
from tests.support.testdata import crop_counts, crop_dirs, data_files, names_under
from tests.support.trained import copy_of, trained_collection

pytestmark = pytest.mark.processes

# runs with `python -I`: no project on sys.path, and an import hook that refuses the project's packages even
# if an installed copy were reachable. It crops each face as model.json describes, from predict's boxes.
STANDALONE = r"""
import importlib.abc, json, sys
OURS = {"core", "db", "scraper", "download", "detect", "crop", "train", "predict", "worker", "waifu", "tests"}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OURS:
            raise ImportError(f"the export must run without the waifu project: {name}")
sys.meta_path.insert(0, Refuse())

import numpy as np
from PIL import Image, ImageOps

export_dir, answers_file = sys.argv[1], sys.argv[2]
manifest = json.load(open(f"{export_dir}/model.json"))
size, margin = manifest["input"]["shape"][1], manifest["crop"]["margin"]

def crop(path, face):
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    if face["detector"] == "whole-image":
        box = (0, 0, image.width, image.height)
    else:  # model.json's crop rule: a square around the box, `margin` of its side added, kept inside
        x, y, w, h = face["box"]
        side = max(1, min(round(max(w, h) * (1 + 2 * margin)), image.width, image.height))
        left = min(max(0, int(round(x + w / 2 - side / 2))), image.width - side)
        top = min(max(0, int(round(y + h / 2 - side / 2))), image.height - side)
        box = (left, top, left + side, top + side)
    return np.asarray(image.crop(box).resize((size, size), Image.Resampling.LANCZOS), np.float32)

answers = [json.loads(line) for line in open(answers_file)]
faces = np.stack([crop(a["path"], f) for a in answers for f in a["faces"]])

import onnxruntime
session = onnxruntime.InferenceSession(f"{export_dir}/model.onnx", providers=["CPUExecutionProvider"])
p_onnx = session.run(None, {session.get_inputs()[0].name: faces})[0]

import keras
layer = keras.layers.TFSMLayer(f"{export_dir}/saved_model", call_endpoint="serving_default")
p_keras = np.asarray(layer(faces)["probabilities"])
cnn = keras.models.load_model(f"{export_dir}/model.keras", compile=False)
names = manifest["class_names"]
print(json.dumps({
    "onnx": [names[i] for i in p_onnx.argmax(1)],
    "keras": [names[i] for i in p_keras.argmax(1)],
    "best_p": p_onnx.max(1).tolist(),
    "cnn_outputs": int(cnn.output_shape[-1]),
    "imported": sorted(m for m in sys.modules if m.split(".")[0] in OURS),
}))
"""


def test_exported_model_names_faces_like_predict_without_the_package(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    # the run's trained collection (tests/support/trained.py); the database only finds the version here
    service_env, summary = copy_of(trained_collection(tmp_path_factory), tmp_path / "data")
    assert summary["status"] == "current", summary
    characters = sorted(crop_counts()[0])
    out = tmp_path / "exported"
    result = run_cli_blocking(service_env, "model", "export", out)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["version"] == summary["version"] and manifest["class_names"] == characters
    assert manifest["unknown"]["threshold"] == pytest.approx(summary["unknown"]["threshold"])
    assert manifest["metrics"]["accuracy"] == pytest.approx(summary["accuracy"])
    for name in ("model.keras", "model.onnx", "saved_model/saved_model.pb"):
        assert (out / name).stat().st_size > 0, name
    # the export checked itself against predict on the version's test faces
    assert manifest["self_check"]["onnx"]["faces"] == manifest["self_check"]["saved_model"]["faces"] > 0

    pictures = [p for p in sorted(crop_dirs()[1].rglob("*")) if p.is_file()]
    pictures += data_files(names_under("raw (unrecognized)"))
    predicted = run_cli_blocking(service_env, "predict", "--json", *pictures)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    answers = [a for a in json_lines(predicted) if a["faces"]]
    assert len(answers) >= 30, len(answers)  # nearly every picture has a face predict found
    answers_file = tmp_path / "answers.jsonl"
    answers_file.write_text("".join(json.dumps(a) + "\n" for a in answers))

    fresh = subprocess.run(
        [sys.executable, "-I", "-c", STANDALONE, str(out), str(answers_file)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    got = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert got["imported"] == [] and got["cnn_outputs"] == len(characters)
    expected = [f["top"][0]["name"] for a in answers for f in a["faces"]]
    assert got["onnx"] == expected
    assert got["keras"] == expected
    # the same probabilities, so the same `unknown` answers under model.json's threshold
    threshold = manifest["unknown"]["threshold"]
    names = [f["name"] for a in answers for f in a["faces"]]
    for name, top1, p in zip(names, expected, got["best_p"], strict=True):
        if abs(p - threshold) > 1e-3:
            assert name == (top1 if p >= threshold else "unknown"), (name, top1, p, threshold)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_model_export_refuses_what_it_cannot_do(service_env, tmp_path: Path) -> None:
    no_model = run_cli_blocking(service_env, "model", "export", tmp_path / "m")
    assert no_model.returncode == 1 and "no current model" in no_model.stdout
    assert not (tmp_path / "m").exists()
    missing = run_cli_blocking(service_env, "model", "export", tmp_path / "m", "--version", "7")
    assert missing.returncode == 1 and "no model version 7" in missing.stdout
