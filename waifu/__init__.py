"""waifu: continuous collection of anime character faces from safebooru."""

__version__ = "0.1.0"
