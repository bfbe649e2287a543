"""`python -m waifu.cli`: the same command line as the `waifu` script."""

from waifu.cli import app

if __name__ == "__main__":  # pragma: no cover
    app()
