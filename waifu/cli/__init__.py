"""The `waifu` command line (`waifu = "waifu.cli:app"`). Verbs are thin: they parse, call a plain function,
and print. One module per group of verbs; importing this package registers them all on `app`, in the
order `waifu --help` lists them."""

from __future__ import annotations

from waifu.cli.base import app
from waifu.cli.services import enqueue_downloads

# isort: off
from waifu.cli import services, operations, models, images, characters, faces  # noqa: F401  (registers verbs)
# isort: on

__all__ = ["app", "enqueue_downloads"]
