"""`waifu faces label | reject | undo`: manual cleaning through labels.manual, the functions the web page uses.
An unknown face id or character is refused on one line with exit 1, as the web page refuses it with 404."""

from __future__ import annotations

from typing import Annotated

import typer

from db.ids import MAX_INTEGER_ID
from waifu.cli.base import console, ensure_db, exits_on, faces_app

# a face id is INTEGER: a larger number is a usage error rather than an overflow in the driver
FACE_ID = typer.Argument(min=1, max=MAX_INTEGER_ID, help="face id (waifu status, the web page)")


@faces_app.command("label")
def faces_label(face_id: Annotated[int, FACE_ID], tag: str) -> None:
    """Give a face a character by hand (overrides the automatic label)."""
    from labels.manual import set_manual_label

    ensure_db()
    with exits_on(LookupError):
        face = set_manual_label(face_id, tag)
    console.print(f"face {face.id}: label [bold]{face.label}[/bold] (manual), split {face.split}")


@faces_app.command("reject")
def faces_reject(face_id: Annotated[int, FACE_ID]) -> None:
    """Mark a detection as not a usable face (never trained on)."""
    from labels.manual import set_manual_label

    ensure_db()
    with exits_on(LookupError):
        face = set_manual_label(face_id, None)
    console.print(f"face {face.id}: rejected")


@faces_app.command("undo")
def faces_undo(
    face_id: Annotated[
        int | None, typer.Argument(min=1, max=MAX_INTEGER_ID, help="only this face's latest change")
    ] = None,
) -> None:
    """Undo the latest label/reject/accept (all faces of a bulk action), or FACE_ID's latest change."""
    from labels.manual import undo

    ensure_db()
    with exits_on(LookupError):
        result = undo(face_id)
    for face in result.faces:
        console.print(f"face {face.id}: {face.state}, label {face.label or '-'} ({face.label_source or '-'})")
    for note in result.kept:
        console.print(f"[yellow]kept[/yellow] {note}")
