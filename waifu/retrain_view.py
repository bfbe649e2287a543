"""`waifu retrain --wait`: follow the task's progress and print the metrics."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table


def follow(result: Any, console: Console, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("waiting for the train worker", total=None)
        while not result.ready():
            if time.monotonic() > deadline:
                console.print(f"[red]gave up waiting after {timeout:.0f} s; the task goes on[/red]")
                return {"status": "timeout"}
            info = result.info if result.state == "PROGRESS" and isinstance(result.info, dict) else {}
            if info:
                epoch = info.get("epoch")
                total = info.get("epochs")
                text = f"training: epoch {epoch}" + (f"/{total}" if total else "")
                if "val_accuracy" in info:
                    text += f", val accuracy {info['val_accuracy']:.3f}"
                progress.update(bar, description=text, completed=epoch or 0, total=total)
            time.sleep(1)
    if result.failed():
        console.print(f"[red]retrain failed: {result.result!r}[/red]")
        return {"status": "failed"}
    summary = result.result or {}
    render_summary(console, summary)
    return summary


def render_summary(console: Console, summary: dict[str, Any]) -> None:
    status = summary.get("status")
    if status in ("busy", "skipped"):
        console.print(f"retrain {status}: {summary.get('reason')}")
        return
    console.print(f"model v{summary['version']}: [bold]{status}[/bold] ({summary['reason']})")
    table = Table(title=f"test split: {summary['test_faces']} faces, trained on {summary['train_faces']}")
    for column in ("character", "precision", "recall", "f1", "faces"):
        table.add_column(column, justify="left" if column == "character" else "right")
    for name, row in summary.get("per_class", {}).items():
        table.add_row(
            name, f"{row['precision']:.2f}", f"{row['recall']:.2f}", f"{row['f1']:.2f}", str(int(row["support"]))
        )
    console.print(table)
    console.print(f"accuracy {summary['accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f}, {summary['duration_s']} s")
