"""`waifu web`: check where it may listen, then serve the application with uvicorn (one process: the
login sessions live in its memory)."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from core.settings import Settings
from waifu.web.security import check_bind


def serve(settings: Settings, host: str, port: int) -> None:
    """Raises security.StartRefused before binding anything when the address needs credentials."""
    check_bind(host, settings)
    import uvicorn

    from waifu.web.app import create_app

    # uvicorn re-raises the signal that stopped it once it has shut down gracefully, through whatever
    # handler was there before: a no-op one makes a requested stop end with status 0, like every other
    # child of `waifu run`
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        server_header=False,
        proxy_headers=False,
    )


@contextmanager
def serving_in_thread(settings: Settings, host: str = "127.0.0.1", port: int = 0, app=None) -> Iterator[str]:
    """The application (`app`, else one made from `settings`) served by uvicorn in a thread of this process
    (tests, benchmarks): yields its base URL, stops it on exit. Port 0 takes a free port."""
    import uvicorn

    from waifu.web.app import create_app

    check_bind(host, settings)
    with socket.socket() as probe:
        probe.bind((host, port))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app or create_app(settings),
            host=host,
            port=port,
            log_level="warning",
            server_header=False,
            proxy_headers=False,
        )
    )
    thread = threading.Thread(target=server.run, name="waifu-web", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the web server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
