"""Dataset export throughput at 10,000 faces (`waifu export`'s own function, SQLite in a temporary folder).

The real 96x96 crops are added as ready, tag-labelled faces until there are --faces of them (each file a
face of its own post, as tests/support/fixtures.add_faces does). Measured in the same run, on the same
files:

- baseline: shutil.copyfile of every crop into a fresh folder (what any export must at least do);
- first export (every file copied, metadata and manifest written, swapped in);
- the same export again with nothing changed (every file hard-linked from the previous one);
- again after 1 % of the faces were relabelled (those copied, the rest linked).

    python -m bench.export [--faces 10000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=10_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="waifu-bench-export-"))
    os.environ.update(
        WAIFU_DATA_DIR=str(work / "data"),
        WAIFU_DATABASE_URL=f"sqlite:///{work}/waifu.db",
        WAIFU_BROKER_URL=os.environ.get("WAIFU_BROKER_URL", "redis://127.0.0.1:6379/9"),
    )
    from rich.console import Console
    from rich.table import Table
    from sqlmodel import select

    from core.settings import get_settings
    from db.engine import session_scope
    from db.migrate import upgrade
    from db.models import Face, LabelSource
    from tests.support.fixtures import add_faces
    from tests.support.testdata import crop_counts
    from waifu.export.dataset import export_dataset
    from waifu.export.selection import ExportFilter

    console = Console()
    try:
        upgrade()
        per_copy = sum(sum(c.values()) for c in crop_counts())
        added = add_faces(copies=-(-args.faces // per_copy), limit=None)
        settings = get_settings()
        with session_scope(readonly=True) as session:
            paths = [settings.data_dir / p for p in session.exec(select(Face.path)).all()]
        console.print(f"{added} faces in the database")

        started = time.perf_counter()
        (work / "baseline").mkdir()
        for i, path in enumerate(paths):
            shutil.copyfile(path, work / "baseline" / f"{i}{path.suffix}")
        baseline = time.perf_counter() - started

        out, flt, rows = work / "export", ExportFilter(), []
        for what in ("first export", "again, nothing changed", "again, 1 % relabelled"):
            if what.endswith("relabelled"):
                with session_scope() as session:
                    faces = session.exec(select(Face).order_by(Face.id)).all()
                    for face in faces[::100]:
                        face.label, face.label_source = "relabelled_by_hand", LabelSource.manual
            started = time.perf_counter()
            result = export_dataset(settings, out, flt)
            seconds = time.perf_counter() - started
            rows.append((what, result, seconds))
        table = Table(title=f"waifu export, {added} faces (SQLite; load {os.getloadavg()[0]:.1f})")
        for col in ("run", "faces", "copied", "linked", "seconds", "faces/s", "vs plain copy"):
            table.add_column(col)
        table.add_row("plain copy of every crop", str(len(paths)), str(len(paths)), "0", f"{baseline:.2f}",
                      f"{len(paths) / baseline:.0f}", "1.00")  # fmt: skip
        for what, result, seconds in rows:
            table.add_row(what, str(result.faces), str(result.copied), str(result.linked), f"{seconds:.2f}",
                          f"{result.faces / seconds:.0f}", f"{baseline / seconds:.2f}")  # fmt: skip
        console.print(table)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
