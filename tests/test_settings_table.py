"""The README's configuration table is the one generated from the Settings fields (waifu.settings_table)."""

from __future__ import annotations

from core.settings import Settings
from tests.support.env import PROJECT_ROOT
from waifu.settings_table import BEGIN, END, table, with_table


def test_the_readme_table_is_generated_from_the_settings() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert with_table(readme) == readme, "the README's settings table is stale: run `make docs`"


def test_every_setting_has_a_row_with_its_description() -> None:
    rows = table().splitlines()[2:]
    assert len(rows) == len(Settings.model_fields)
    for row, (name, field) in zip(rows, Settings.model_fields.items(), strict=True):
        assert row.startswith(f"| `WAIFU_{name.upper()}` |") and field.description, name


def test_a_changed_description_makes_the_readme_stale() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    start, end = readme.index(BEGIN), readme.index(END)
    edited = readme[:start] + readme[start:end].replace("Redis URL of the Celery broker", "a broker") + readme[end:]
    assert edited != readme and with_table(edited) != edited
