"""`waifu export DIR`: the collection's labelled faces as a dataset other tools read.

Design notes: docs/architecture.md, `waifu/export/dataset.py`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from core.logs import kv
from core.settings import Settings
from db.engine import session_scope
from waifu.export.atomic import clean_leftovers, staging_dir, swap_in
from waifu.export.selection import ExportFilter, FaceRecord, counts, select_faces

log = logging.getLogger("waifu.export")

FORMATS = ("imagefolder", "jsonl")
MANIFEST = "export.json"
MANIFEST_VERSION = 1
METADATA = "metadata.jsonl"
JSONL = "faces.jsonl"


class ExportRefused(RuntimeError):
    """The destination is something an export must not replace (a folder that is not an export)."""


@dataclass
class ExportResult:
    directory: Path
    format: str
    faces: int
    copied: int  # new or changed since the last export
    linked: int  # unchanged, hard-linked from the last export
    removed: int  # in the last export, not in this one
    counts: dict[str, dict[str, int]]
    missing: list[int] = field(default_factory=list)  # faces whose crop file is gone from the data dir

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "format": self.format,
            "faces": self.faces,
            "copied": self.copied,
            "linked": self.linked,
            "removed": self.removed,
            "counts": self.counts,
            "missing": self.missing,
        }


def folder_name(character: str) -> str:
    """A character's folder: the tag itself when it is a safe file name, else percent-encoded (one tag,
    one folder; metadata keeps the tag as it is)."""
    name = quote(character, safe="_-()!'~+,;=@&")
    return "%2E" + name[1:] if name.startswith(".") else name


def relative_path(record: FaceRecord, fmt: str) -> str:
    suffix = Path(record.source_path).suffix.lower() or ".png"
    if fmt == "jsonl":
        return f"images/{record.face_id}{suffix}"
    return f"{record.split}/{folder_name(record.character)}/{record.face_id}{suffix}"


def _previous_files(destination: Path) -> dict[str, str]:
    """{relative path: content key} of the export already at `destination`; refuses to touch a folder
    that is not one (an export replaces the whole folder)."""
    if not destination.exists():
        return {}
    manifest = destination / MANIFEST
    if not destination.is_dir() or (not manifest.is_file() and any(destination.iterdir())):
        raise ExportRefused(f"{destination} exists and is not a waifu export (no {MANIFEST}); choose another folder")
    if not manifest.is_file():
        return {}
    try:
        return dict(json.loads(manifest.read_text()).get("files", {}))
    except (ValueError, AttributeError) as exc:
        raise ExportRefused(f"{manifest} is not readable ({exc}); move the folder away or choose another") from exc


def _content_key(record: FaceRecord, source: Path) -> str:
    if not record.content_key.startswith("path:"):
        return record.content_key
    st = source.stat()  # no hash recorded: the file's size and time stand for its content
    return f"{record.content_key}:{st.st_size}:{st.st_mtime_ns}"


def _place(source: Path, previous: Path | None, target: Path, made: set[Path]) -> bool:
    """Puts the file at `target`: a hard link to the previous export's copy when there is one (True),
    else a copy of the data dir's file (False). `made`: folders already created."""
    if target.parent not in made:
        target.parent.mkdir(parents=True, exist_ok=True)
        made.add(target.parent)
    if previous is not None:
        try:
            os.link(previous, target)
            return True
        except OSError:
            pass  # gone since, or no hard links here (another file system, FAT): copy instead
    shutil.copyfile(source, target)
    return False


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n" for row in rows)


def export_dataset(settings: Settings, destination: Path, flt: ExportFilter, fmt: str = "imagefolder") -> ExportResult:
    """Writes the faces `flt` keeps to `destination` (see the module docstring) and returns what it did."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    destination = destination.absolute()
    clean_leftovers(destination)
    previous = _previous_files(destination)
    with session_scope(readonly=True) as session:  # one short read; no transaction while copying
        records = select_faces(session, flt)

    staging = staging_dir(destination)
    try:
        files: dict[str, str] = {}
        rows: dict[str, list[dict[str, Any]]] = {}
        copied = linked = 0
        missing: list[int] = []
        made: set[Path] = set()
        for record in records:
            source = settings.data_dir / record.source_path
            rel = relative_path(record, fmt)
            try:
                key = _content_key(record, source)
                same = previous.get(rel) == key
                if _place(source, destination / rel if same else None, staging / rel, made):
                    linked += 1
                else:
                    copied += 1
            except FileNotFoundError:
                missing.append(record.face_id)
                log.warning(kv("export missing crop", face=record.face_id, path=record.source_path))
                continue
            files[rel] = key
            if fmt == "jsonl":
                rows.setdefault(JSONL, []).append({"file": rel, **record.metadata})
            else:
                split_dir, _, inside = rel.partition("/")
                rows.setdefault(f"{split_dir}/{METADATA}", []).append(
                    {"file_name": inside, "file": rel, **record.metadata}
                )
        for name, lines in rows.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(_jsonl(lines), encoding="utf-8")
        left_out = set(missing)
        kept = [r for r in records if r.face_id not in left_out]
        result = ExportResult(
            destination,
            fmt,
            len(files),
            copied,
            linked,
            len(set(previous) - set(files)),
            counts(kept),
            missing,
        )
        manifest = {
            "version": MANIFEST_VERSION,
            "format": fmt,
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "filter": flt.describe(),
            "faces": result.faces,
            "counts": result.counts,
            "missing": missing,
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
        swap_in(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(kv("export done", **{k: v for k, v in result.to_dict().items() if k != "counts"}))
    return result
