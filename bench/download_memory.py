"""Memory of the io worker's download path over many files (issue 17): a TLS context built per download,
as httpx does for each Client by default (how download/fetch.py ran until the soak found the io worker
growing), against the one shared context of download/tls.py, same files, same run.

Each way runs in a fresh process: `--threads` threads (the io pool's slots) call download.fetch.fetch on a
local HTTP server's files, through the real per-host limiter in Redis (WAIFU_BROKER_URL, else
127.0.0.1:6379/0). RSS is read after a warm-up round and after each later round; the report gives each
way's RSS, its growth after the warm-up, and the ratio of the two.

    python -m bench.download_memory [--files 4000] [--threads 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 4  # one warm-up round, then three measured ones

CHILD = r"""
import http.server, json, os, socketserver, sys, tempfile, threading
from pathlib import Path
sys.path.insert(0, sys.argv[1])
way, files, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from core.settings import Settings
from download import fetch as fetching, tls

if way == "per-download":  # what httpx does for each Client when it is given no context
    fetching.shared_context = lambda: tls.shared_context.__wrapped__()

BODY = os.urandom(200_000)

class Files(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass

class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

server = Server(("127.0.0.1", 0), Files)
threading.Thread(target=server.serve_forever, daemon=True).start()
settings = Settings(
    broker_url=os.environ.get("WAIFU_BROKER_URL", "redis://127.0.0.1:6379/0"),
    downloads_per_second=100000.0,
    local_hosts=["127.0.0.1"],
)
url = f"http://127.0.0.1:{server.server_address[1]}/x.png"
workdir = Path(tempfile.mkdtemp())

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def worker(count):
    for _ in range(count):
        fetching.fetch(url, settings, workdir, frozenset({"127.0.0.1"})).path.unlink()

samples = []
for _ in range(ROUNDS):
    pool = [threading.Thread(target=worker, args=(files // ROUNDS // threads,)) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    samples.append(rss_mib())
print(json.dumps(samples))
""".replace("ROUNDS", str(ROUNDS))


def measure(way: str, files: int, threads: int) -> list[float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 * 1024 * 1024)}  # as the service's workers run
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), way, str(files), str(threads)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    results = {way: measure(way, args.files, args.threads) for way in ("per-download", "shared")}
    print(f"{args.files} downloads of 200 KB by {args.threads} threads, RSS in MiB after each of {ROUNDS} rounds")
    print("| TLS context | after warm-up | after each later round | growth after warm-up |")
    print("|---|---|---|---|")
    for way, samples in results.items():
        growth = (samples[-1] / samples[0] - 1) * 100
        later = ", ".join(f"{s:.1f}" for s in samples[1:])
        print(f"| {way} | {samples[0]:.1f} | {later} | {growth:+.1f}% |")
    ratio = results["shared"][-1] / results["per-download"][-1]
    print(f"RSS at the end, shared / per-download: {ratio:.2f}")


if __name__ == "__main__":
    main()
