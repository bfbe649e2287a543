"""The verbs of the classifier and what it is trained on: `waifu retrain`, `report`, `export` (the labelled
faces as a dataset) and `model export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core.settings import get_settings
from waifu.cli.base import app, console, ensure_db, model_app


@app.command("retrain")
def retrain_cmd(
    force: Annotated[bool, typer.Option("--force", help="Retrain even if few new faces arrived")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress and print the metrics")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits at most")] = 6 * 3600,
) -> None:
    """Enqueue a retrain on the `train` queue (one at a time)."""
    from worker.app import app as celery_app
    from worker.retrain_request import request_retrain

    request = request_retrain(force)
    if not request.started:  # queued from the web page or another terminal: the same single retrain
        console.print(f"{request.message} (task {request.task_id}); not starting another")
        raise typer.Exit(1)
    console.print(f"retrain enqueued: task {request.task_id}")
    if not wait:
        return
    result = celery_app.AsyncResult(request.task_id)
    from waifu.retrain_view import follow

    summary = follow(result, console, timeout)
    if summary.get("status") in ("busy", "skipped", "failed"):
        raise typer.Exit(1)


@app.command("report")
def report_cmd(
    out: Annotated[Path, typer.Option(help="Directory for the PNGs and index.html")] = Path("report"),
) -> None:
    """Write PNGs (training curves, confusion matrix, test predictions, growth) and one HTML page."""
    from train.report import write_report

    ensure_db()
    page = write_report(get_settings(), out)
    console.print(f"report written: {page}")


@app.command("export")
def export_cmd(
    directory: Annotated[Path, typer.Argument(help="where the dataset goes (replaced as a whole)")],
    fmt: Annotated[str, typer.Option("--format", help="imagefolder (+ metadata.jsonl) or jsonl")] = "imagefolder",
    characters: Annotated[str, typer.Option(help="only these characters (comma separated)")] = "",
    sources: Annotated[
        str, typer.Option(help="label sources: tag, manual, inferred (default), and doubtful, rejected")
    ] = "tag,manual,inferred",
    min_probability: Annotated[
        float | None, typer.Option(min=0, max=1, help="inferred labels only at this model probability or more")
    ] = None,
    since: Annotated[str, typer.Option(help="faces collected on or after this date (ISO, UTC)")] = "",
    until: Annotated[str, typer.Option(help="faces collected before this date (ISO, UTC)")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable summary")] = False,
) -> None:
    """Export the labelled faces as a dataset (train/ and test/ per character), incrementally and atomically."""
    from waifu.export.view import run_dataset_export

    ensure_db()
    options = {"characters": characters, "sources": sources, "min_probability": min_probability}
    raise typer.Exit(run_dataset_export(directory, fmt, options | {"since": since, "until": until}, as_json, console))


@model_app.command("export")
def model_export_cmd(
    directory: Annotated[Path, typer.Argument(help="where the model goes (replaced as a whole)")],
    version: Annotated[
        int | None, typer.Option(min=1, max=2**63 - 1, help="model version (default: the current one)")
    ] = None,
    onnx: Annotated[bool, typer.Option(help="also write model.onnx (needs the export extra)")] = True,
) -> None:
    """Write a model as .keras, SavedModel, ONNX and model.json, for serving without this package."""
    from waifu.export.view import run_model_export

    ensure_db()
    raise typer.Exit(run_model_export(directory, version, onnx, console))
