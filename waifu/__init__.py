"""waifu: continuous collection of anime character faces from safebooru; the command line and its views."""

from core import __version__

__all__ = ["__version__"]
