"""The files `waifu detect` and `waifu predict` are given: each opened and its faces found in turn, a file
that cannot be read or detected an error entry of its own; and where `--annotate DIR` writes its pictures,
one PNG per input, never two inputs on one name."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from PIL.Image import Image

    from core.settings import Settings

# (path, image, detections, where its annotated picture goes or None) -> the file's entry
Describe = Callable[[Path, "Image", list, "Path | None"], dict[str, Any]]


def each_image(
    paths: Iterable[Path],
    settings: Settings,
    detector: str,
    describe: Describe,
    *,
    as_json: bool,
    annotate_dir: Path | None,
    kind: str,
) -> Iterator[dict[str, Any]]:
    """One entry per path, in order: `describe`'s for an image whose faces were found; for a file that cannot
    be read, or whose detection overruns WAIFU_IMAGE_TIME_LIMIT_S, `{"path", "error", "faces": []}`, and the
    others go on. Under `--json` each entry is also printed as a JSON line as soon as it is known (a long
    batch shows progress to a pipe). DIR is created here, before any work: a typo is answered at once."""
    if annotate_dir:
        prepare(annotate_dir)
    return _entries(paths, settings, detector, describe, as_json, annotate_dir, kind)


def _entries(paths, settings, detector, describe, as_json, annotate_dir, kind) -> Iterator[dict[str, Any]]:
    from core.errors import Refused
    from core.images import open_image
    from detect.bounded import BoundedDetector, DetectionFailed

    written: set[str] = set()
    with BoundedDetector(settings) as bounded:
        for path in paths:
            try:
                image = open_image(path, settings.max_image_pixels)
                detections = bounded.find(image, detector, str(path))
            except (Refused, DetectionFailed) as exc:
                entry = {"path": str(path), "error": str(exc), "faces": []}
            else:
                out = output_path(annotate_dir, path, kind, written) if annotate_dir else None
                entry = describe(path, image, detections, out)
            if as_json:
                print(json.dumps(entry), flush=True)
            yield entry


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
