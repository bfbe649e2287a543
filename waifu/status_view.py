"""Renders `waifu status` as tables a person can read at a glance."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

SOURCES = ("tag", "ambiguous", "inferred", "manual")
STATE_STYLE = {"failed": "red", "skipped": "yellow", "downloaded": "green", "done": "green", "discovered": "cyan"}


def render_status(console: Console, data: dict[str, Any]) -> None:
    render_stalls(console, data)
    states = list(data["posts"])
    overview = Table(title=f"posts: {data['total']}")
    for state in states:
        overview.add_column(state, justify="right", style=STATE_STYLE.get(state))
    overview.add_row(*(str(data["posts"][s]) for s in states))
    console.print(overview)

    per_char = Table(title="per character")
    per_char.add_column("character", no_wrap=True)
    for state in states:
        per_char.add_column(state, justify="right", style=STATE_STYLE.get(state))
    for tag, counts in data["characters"].items():
        per_char.add_row(tag, *(str(counts.get(s, 0)) for s in states))
    console.print(per_char)

    faces = data.get("faces")
    if faces and any(faces["states"].values()):
        table = Table(
            title=(
                f"faces: {sum(faces['states'].values())} "
                f"({faces['posts_without_face']} posts without a face, "
                f"{faces['near_duplicates']} near-duplicates)"
            )
        )
        for state in faces["states"]:
            table.add_column(state, justify="right")
        for source in SOURCES:
            table.add_column(f"label: {source}", justify="right")
        table.add_column("doubtful tag", justify="right", style="yellow")
        table.add_row(
            *(str(n) for n in faces["states"].values()),
            *(str(faces["label_sources"].get(s, 0)) for s in SOURCES),
            str(faces.get("doubtful", 0)),
        )
        console.print(table)
        recognition = data.get("recognition", [])
        if recognition:
            split = Table(title="recognition per character (train/test: tag and manual labels; inferred: train only)")
            for column in ("character", "faces", "train", "test", "inferred", "F1", "warning"):
                split.add_column(column, justify="left" if column in ("character", "warning") else "right")
            for row in recognition:
                f1 = "-" if row["f1"] is None else f"{row['f1']:.2f}"
                split.add_row(
                    row["character"],
                    *(str(row[k]) for k in ("available", "train", "test", "inferred")),
                    f1,
                    f"[yellow]{row['warning']}[/yellow]" if row["warning"] else "",
                )
            console.print(split)

    console.print(model_line(data.get("model") or {}))

    queues = Table(title="queues (messages waiting)")
    for name in data["queues"]:
        queues.add_column(name, justify="right")
    queues.add_row(*("unreachable" if n is None else str(n) for n in data["queues"].values()))
    console.print(queues)

    limits = data.get("time_limits")
    if limits is not None:
        console.print(time_limits_line(limits), style="red" if any(limits.values()) else None)

    if data["failure_reasons"]:
        reasons = Table(title="most common failure reasons")
        reasons.add_column("count", justify="right", style="red")
        reasons.add_column("reason")
        reasons.add_column("example", overflow="fold")
        for r in data["failure_reasons"]:
            reasons.add_row(str(r["count"]), r["reason"], r["example"])
        console.print(reasons)

    if data["cursors"]:
        cursors = Table(title="scrape cursors")
        for column in ("tag", "newest id", "backfill", "requests", "last poll", "last error"):
            cursors.add_column(column)
        for c in data["cursors"]:
            cursors.add_row(
                c["tag"],
                str(c["newest_id"] or "-"),
                backfill_word(c),
                str(c["requests"]),
                c["last_poll_at"] or "never",
                c["last_error"] or "",
            )
        console.print(cursors)


def render_stalls(console: Console, data: dict[str, Any]) -> None:
    """Stalled steps first, one sentence each (waifu.stalls): what an operator must act on."""
    for stall in data.get("stalls") or []:
        console.print(f"STALLED {stall['text']}", style="bold red", markup=False, highlight=False, soft_wrap=True)


def time_limits_line(limits: dict[str, int]) -> str:
    """One line: rows a time limit or a dying worker stopped (hangs must be seen)."""
    return (
        f"time limits: {limits['failed']} rows failed, {limits['retrying']} waiting to be tried again; "
        f"{limits['crashed']} rows failed after their worker crashed on every attempt"
    )


def backfill_word(cursor: dict) -> str:
    """The first sync's backfill, and whether a walk back reached the tag's oldest post."""
    if cursor.get("history_done"):
        return "all history"
    return "done" if cursor["backfill_done"] else "pending"


def _scores(v: dict) -> str:
    acc = "-" if v["accuracy"] is None else f"{v['accuracy']:.3f}"
    f1 = "-" if v["macro_f1"] is None else f"{v['macro_f1']:.3f}"
    loop = f", loop round {v['loop_round']}" if v["loop_round"] else ""
    return f"accuracy {acc}, macro-F1 {f1}{loop}, {v['created_at']}"


def model_line(model: dict) -> str:
    """The model predictions use, and the latest retrain when it was not promoted."""
    current, latest = model.get("current"), model.get("latest")
    if current:
        line = f"model: v{current['version']} current ({_scores(current)})"
    else:
        line = "model: none yet (`waifu retrain` trains one now; the scheduled check waits for enough labelled faces)"
    if latest:
        why = f": {escape(latest['reason'])}" if latest.get("reason") else ""
        line += f"\n  latest retrain: v{latest['version']} {latest['status']}{why}"
    return line
