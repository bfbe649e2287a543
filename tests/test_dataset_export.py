"""`waifu export`: the real crops as tag-labelled faces, exported by the CLI and read back by the loaders
people use (Keras' image_dataset_from_directory, Hugging Face's imagefolder); counts equal `waifu status`;
filters; incremental re-runs; an interrupted export leaves the previous one whole."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from sqlmodel import select

from db.engine import session_scope
from db.models import Face, LabelSource
from tests.support.cli import run_cli_blocking
from tests.support.fixtures import add_faces

pytestmark = pytest.mark.processes  # CLI processes, TensorFlow in the test process


def status_counts(env: dict[str, str]) -> dict[str, dict[str, int]]:
    """{split: {character: faces}} as `waifu status --json` reports them."""
    result = run_cli_blocking(env, "status", "--json")
    assert result.returncode == 0, result.stderr
    out: dict[str, dict[str, int]] = {}
    for character, per_split in json.loads(result.stdout)["faces"]["per_character"].items():
        for split, n in per_split.items():
            out.setdefault(split, {})[character] = n
    return out


def export(env: dict[str, str], *args: str | Path) -> dict:
    result = run_cli_blocking(env, "export", *map(str, args), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def keras_counts(split_dir: Path) -> dict[str, int]:
    import keras

    ds = keras.utils.image_dataset_from_directory(split_dir, image_size=(96, 96), shuffle=False, batch_size=64)
    labels = [int(y) for _, batch in ds for y in batch.numpy()]
    return {name: labels.count(i) for i, name in enumerate(ds.class_names)}


def hf_counts(root: Path) -> dict[str, dict[str, int]]:
    from datasets import load_dataset

    loaded = load_dataset("imagefolder", data_dir=str(root), cache_dir=str(root.parent / "hf-cache"))
    out: dict[str, dict[str, int]] = {}
    for split, rows in loaded.items():
        for row in rows:
            assert row["image"].size == (96, 96)
            per = out.setdefault(split, {})
            per[row["character"]] = per.get(row["character"], 0) + 1
    return out


def files_of(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_export_reads_back_in_keras_and_hugging_face_with_status_counts(service_env, redis_client, tmp_path) -> None:
    add_faces()
    out = tmp_path / "dataset"
    summary = export(service_env, out)
    expected = status_counts(service_env)
    assert summary["counts"] == expected and summary["faces"] == summary["copied"] == 108
    for split, per in expected.items():
        assert keras_counts(out / split) == per, split
    assert hf_counts(out) == expected
    # every face says where it came from, in Hugging Face's metadata.jsonl beside its split
    row = json.loads((out / "train" / "metadata.jsonl").read_text().splitlines()[0])
    assert (out / "train" / row["file_name"]).is_file() and (out / row["file"]).is_file()
    assert {"character", "label_source", "split", "site", "post_id", "md5", "box", "detector", "detector_score",
            "phash"} <= set(row)  # fmt: skip
    assert row["label_source"] == "tag" and row["split"] == "train"

    # the jsonl format: one line per face, the crops beside it
    lines = export(service_env, tmp_path / "as-jsonl", "--format", "jsonl")
    records = [json.loads(x) for x in (tmp_path / "as-jsonl" / "faces.jsonl").read_text().splitlines()]
    assert len(records) == lines["faces"] == 108 and all((tmp_path / "as-jsonl" / r["file"]).is_file() for r in records)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_export_filters_and_increments(service_env, redis_client, tmp_path) -> None:
    add_faces()
    with session_scope() as session:  # one face doubted, one rejected, one labelled by hand
        faces = session.exec(select(Face).where(Face.split == "train").order_by(Face.id)).all()
        doubted, rejected, manual = faces[0], faces[1], faces[2]
        doubted.doubt, doubted.doubt_score = "looks like someone else", 0.9
        rejected.state, rejected.label, rejected.label_source = "rejected", None, LabelSource.manual
        manual.label_source = LabelSource.manual
        ids = doubted.id, rejected.id, manual.id
        ext = Path(manual.path).suffix  # the shared crops are JPEGs: the export keeps each file as it is
    out = tmp_path / "dataset"
    first = export(service_env, out)
    assert first["faces"] == 106  # the doubtful and the rejected face are left out
    assert export(service_env, tmp_path / "all", "--sources", "tag,manual,doubtful,rejected")["faces"] == 108
    assert (tmp_path / "all" / "train" / "_rejected" / f"{ids[1]}{ext}").is_file()
    only_manual = export(service_env, tmp_path / "manual", "--sources", "manual")
    assert only_manual["faces"] == 1 and files_of(tmp_path / "manual" / "train") == {
        f"{manual.label}/{ids[2]}{ext}",
        "metadata.jsonl",
    }
    maki = export(service_env, tmp_path / "maki", "--characters", "nishikino_maki")
    assert list(maki["counts"]["train"]) == ["nishikino_maki"] and list(maki["counts"]["test"]) == ["nishikino_maki"]
    future = export(service_env, tmp_path / "future", "--since", "2999-01-01")
    assert future["faces"] == 0 and files_of(tmp_path / "future") == {"export.json"}
    bad = run_cli_blocking(service_env, "export", tmp_path / "bad", "--sources", "tag,guess")
    assert bad.returncode == 2 and "guess" in bad.stdout and not (tmp_path / "bad").exists()

    # re-running copies nothing: unchanged files are the very same files (hard links)
    inode = (out / "train" / f"{manual.label}/{ids[2]}{ext}").stat().st_ino
    again = export(service_env, out)
    assert (again["copied"], again["linked"], again["removed"]) == (0, 106, 0)
    assert (out / "train" / f"{manual.label}/{ids[2]}{ext}").stat().st_ino == inode
    # a relabelled face moves: one copied, one removed, the rest kept
    assert run_cli_blocking(service_env, "characters", "add", "takimoto_hifumi").returncode == 0
    relabel = run_cli_blocking(service_env, "faces", "label", str(ids[2]), "takimoto_hifumi")
    assert relabel.returncode == 0, relabel.stderr
    moved = export(service_env, out)
    assert (moved["copied"], moved["linked"], moved["removed"]) == (1, 105, 1)
    assert (out / "train" / f"takimoto_hifumi/{ids[2]}{ext}").is_file()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_interrupted_export_leaves_the_previous_one_whole(service_env, redis_client, tmp_path) -> None:
    add_faces()
    out = tmp_path / "dataset"
    export(service_env, out)
    before = {name: (out / name).read_bytes() for name in files_of(out)}
    # a crop that cannot be read half-way through: the export stops with an error after copying others
    with session_scope() as session:
        broken = session.exec(select(Face).order_by(Face.id)).all()[54]
    data_dir = Path(service_env["WAIFU_DATA_DIR"])
    crop = data_dir / broken.path
    crop.unlink()
    crop.mkdir()  # a directory where the file was: reading it fails
    failed = run_cli_blocking(service_env, "export", out)
    assert failed.returncode == 1 and "IsADirectoryError" in failed.stdout and "unchanged" in failed.stdout
    assert {name: (out / name).read_bytes() for name in files_of(out)} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".waifu-export")] == []

    # a killed export leaves its staging tree; the next one removes it and writes the whole dataset
    crop.rmdir()
    shutil.copy(next(p for p in (data_dir / "faces").rglob("*") if p.is_file()), crop)
    stale = tmp_path / f".waifu-export-{2**22 + 7}-deadbeef-dataset"  # no such process
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "half.png").write_bytes(b"half")
    done = export(service_env, out)
    assert done["faces"] == 108 and not stale.exists()
    # a folder that is not an export is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    refused = run_cli_blocking(service_env, "export", tmp_path / "mine")
    assert refused.returncode == 1 and "not a waifu export" in refused.stdout
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
