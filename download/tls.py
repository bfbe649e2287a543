"""One TLS context for every download: building one loads the whole CA bundle into OpenSSL.

httpx builds a new context for each Client unless it is given one. A download makes one Client, so an io
worker built about one context per file and its memory kept rising (8 threads fragment it across glibc's
arenas): `python -m bench.download_memory` measures it. A context is safe to share between threads once set up.
"""

from __future__ import annotations

import os
import ssl
from functools import cache


@cache
def shared_context() -> ssl.SSLContext:
    """The context httpx would build by default (SSL_CERT_FILE / SSL_CERT_DIR honoured, else certifi's bundle)."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    import certifi

    return ssl.create_default_context(cafile=certifi.where())
