"""The verbs that look at local image files: `waifu detect` (faces found, no broker, no database) and
`waifu predict` (faces named by the current model); the views are waifu.detect_view and waifu.predict_view."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core.settings import get_settings
from waifu.cli.base import app, console, ensure_db


@app.command("predict")
def predict_cmd(
    paths: Annotated[list[Path], typer.Argument(help="illustrations or face crops")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image")] = False,
    annotate: Annotated[Path | None, typer.Option(help="Write each image with boxes and names here")] = None,
) -> None:
    """Detect faces and name each with the current model (top 3 with probabilities)."""
    from waifu.predict_view import predict_paths

    ensure_db()
    if not predict_paths(paths, as_json=as_json, annotate_dir=annotate, console=console):
        raise typer.Exit(1)


@app.command("detect")
def detect_cmd(
    paths: Annotated[list[Path], typer.Argument(help="image files")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per image")] = False,
    annotate: Annotated[Path | None, typer.Option(help="Write each image with boxes drawn into this dir")] = None,
    detector: Annotated[str, typer.Option(help="animeface, lbpcascade or both (default: WAIFU_DETECTOR)")] = "",
) -> None:
    """Detect faces locally (no broker, no database) and show what was found."""
    from waifu.detect_view import detect_paths

    settings = get_settings()
    results = detect_paths(
        paths,
        as_json=as_json,
        annotate_dir=annotate,
        detector=detector or settings.detector,
        console=console,
        settings=settings,
    )
    if any("error" in entry for entry in results):
        raise typer.Exit(1)
