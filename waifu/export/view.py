"""What `waifu export` and `waifu model export` print; the work is in dataset.py and model.py.
Returns exit statuses: 0 done, 1 done with faces missing / export failed, 2 bad options."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from core.settings import get_settings


def _date(text: str, option: str) -> datetime | None:
    if not text.strip():
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"bad option {option}: {text[:40]!r} is not an ISO date (2026-12-03 or 2026-12-03T10:00)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _names(text: str) -> frozenset[str]:
    return frozenset(part.strip() for part in text.split(",") if part.strip())


def run_dataset_export(directory: Path, fmt: str, options: dict[str, Any], as_json: bool, console: Console) -> int:
    from waifu.export.dataset import ExportRefused, export_dataset
    from waifu.export.selection import ExportFilter

    try:
        flt = ExportFilter(
            characters=_names(options["characters"]),
            sources=_names(options["sources"]),
            min_probability=options["min_probability"],
            since=_date(options["since"], "--since"),
            until=_date(options["until"], "--until"),
        )
        result = export_dataset(get_settings(), directory, flt, fmt)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        return 2
    except ExportRefused as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        return 1
    except OSError as exc:  # a crop unreadable, the disk full: the previous export is untouched
        console.print(f"[red]export failed, {directory} unchanged: {type(exc).__name__}: {exc}[/red]", highlight=False)
        return 1
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        console.print(
            f"exported {result.faces} face(s) to {result.directory} ({result.format}): {result.copied} copied, "
            f"{result.linked} unchanged, {result.removed} removed",
            highlight=False,
        )
        for split, per in result.counts.items():
            console.print(f"  {split}: " + ", ".join(f"{name} {n}" for name, n in per.items()), highlight=False)
    if result.missing:
        shown = ", ".join(map(str, result.missing[:10]))
        console.print(f"[red]{len(result.missing)} face(s) left out, crop file missing: {shown}[/red]")
        return 1
    return 0


def run_model_export(directory: Path, version: int | None, onnx: bool, console: Console) -> int:
    from waifu.export.model import ModelExportError, export_model

    try:
        result = export_model(get_settings(), directory, version, onnx=onnx)
    except ModelExportError as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        return 1
    except OSError as exc:  # a full disk, a folder not writable: nothing was swapped in
        console.print(f"[red]model export failed, {directory} unchanged: {type(exc).__name__}: {exc}[/red]")
        return 1
    console.print(f"model version {result.version} exported to {result.directory}:", highlight=False)
    for name, note in result.files.items():
        console.print(f"  {name}: {note}", highlight=False)
    return 0
