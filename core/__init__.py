"""The base below every step: settings, logging, errors, HTTP policy, image loading, the broker client."""

__version__ = "0.2.0"
