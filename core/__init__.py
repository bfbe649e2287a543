"""The base below every step: settings, logging, errors, HTTP policy, image loading, the broker client."""

from importlib.metadata import PackageNotFoundError, version

try:  # the one source of the version is pyproject.toml, read from the installed distribution
    __version__ = version("waifu")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
