"""Where `--annotate DIR` writes its pictures: one PNG per input, never two inputs on one name."""

from __future__ import annotations

from pathlib import Path

import typer


def prepare(directory: Path) -> Path:
    """Creates DIR; a path that cannot be a directory is the user's typo, answered before any work."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise typer.BadParameter(f"{directory} is a file, not a directory", param_hint="'--annotate'") from exc
    except PermissionError as exc:
        raise typer.BadParameter(f"cannot create {directory}: permission denied", param_hint="'--annotate'") from exc
    return directory


def output_path(directory: Path, source: Path, kind: str, taken: set[str]) -> Path:
    """`<stem>.<kind>.png`; a later input with the same stem (riko.jpg and riko.png, a/1.jpg and b/1.jpg)
    gets `<stem>-2.<kind>.png` and so on, so no picture of this run overwrites another."""
    name, n = f"{source.stem}.{kind}.png", 1
    while name in taken:
        n += 1
        name = f"{source.stem}-{n}.{kind}.png"
    taken.add(name)
    return directory / name
