"""The shared 3-character set end to end, from an empty database (issue 19): `waifu run` collects the
illustrations from the fake safebooru, the scheduled retrain and its self-training loop run by themselves (no
forced retrain), then `waifu predict` names the character of illustrations held out of the collection.

Per character, `--holdout` of the illustrations (seeded) are never published. The run ends when every post is
terminal, no retrain is queued or running and no model version came for `--quiet` seconds (the steady state),
or at `--timeout`. Reported: the collection (posts, faces, ambiguous share), each model version (loop round,
inferred labels trained on and changed, own test split), and on the held-out illustrations the share named
right by the most confident face and by any face. Without ImageNet weights here (`WAIFU_BACKBONE_WEIGHTS=none`).

    WAIFU_TEST_DATA=/work/shared/data .venv/bin/python -m bench.end_to_end [--holdout 0.15] [--timeout 3600]

Redis: database 14 of WAIFU_BENCH_REDIS_URL (default redis://127.0.0.1:6379/14), flushed first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WAIFU = str(Path(sys.executable).with_name("waifu"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--holdout", type=float, default=0.15, help="share of each character's illustrations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--quiet", type=float, default=240.0, help="seconds with no new model version: steady")
    parser.add_argument("--retrain-check", type=float, default=60.0, help="WAIFU_RETRAIN_INTERVAL_S for the run")
    parser.add_argument("--keep", action="store_true", help="keep the data directory (printed)")
    return parser.parse_args()


def held_out(images: list[tuple[str, Path]], share: float, seed: int) -> tuple[list, list]:
    """(published, held out): per character, `share` of its illustrations (at least one) held out."""
    rng = random.Random(seed)
    published, held = [], []
    for tag in sorted({t for t, _ in images}):
        mine = [(t, p) for t, p in images if t == tag]
        rng.shuffle(mine)
        n = max(1, round(share * len(mine)))
        held += mine[:n]
        published += mine[n:]
    return published, held


class SiteThread:
    """The fake safebooru on its own event loop in a thread, serving the published illustrations."""

    def __init__(self, published: list[tuple[str, Path]]) -> None:
        self.published, self.url = published, ""
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from tests.support.fake_safebooru import FakeSafebooru, publish

        asyncio.set_event_loop(self.loop)
        self.site = FakeSafebooru()
        per_tag: dict[str, list[tuple[bytes, str]]] = {}
        for tag, path in self.published:
            per_tag.setdefault(tag, []).append((path.read_bytes(), path.suffix.lower()))
        publish(self.site, per_tag)
        self.url = self.loop.run_until_complete(self.site.start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.site.stop())

    def __enter__(self) -> str:
        self.thread.start()
        self.ready.wait(60)
        return self.url

    def __exit__(self, *_) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def snapshot() -> dict:
    """Posts by state, faces by state and label source, model versions (oldest first)."""
    from sqlmodel import func, select

    from db.engine import session_scope
    from db.models import Face, ModelVersion, Post

    with session_scope(readonly=True) as session:
        posts = dict(session.exec(select(Post.state, func.count()).group_by(Post.state)).all())
        faces = dict(session.exec(select(Face.state, func.count()).group_by(Face.state)).all())
        sources = dict(
            session.exec(
                select(Face.label_source, func.count()).where(Face.state == "ready").group_by(Face.label_source)
            ).all()
        )
        versions = [
            {
                "id": v.id,
                "status": v.status,
                "round": v.loop_round,
                "accuracy": v.accuracy,
                "macro_f1": v.macro_f1,
                "inferred_trained": v.inferred_trained,
                "inferred_changed": v.inferred_changed,
                "duration_s": v.duration_s,
                "at": v.created_at.timestamp(),
            }
            for v in session.exec(select(ModelVersion).order_by(ModelVersion.id)).all()
        ]
    return {"posts": posts, "faces": faces, "sources": sources, "versions": versions}


def retrain_busy() -> bool:
    """A retrain queued or running (the last one requested, by the beat, a follow-up or a person)."""
    from worker.app import app
    from worker.retrain_request import last_task_id

    task = last_task_id()
    return task is not None and app.AsyncResult(task).state not in ("SUCCESS", "FAILURE", "REVOKED")


def steady(snap: dict, published: int, quiet: float) -> bool:
    terminal = sum(snap["posts"].get(s, 0) for s in ("done", "failed", "skipped"))
    versions = snap["versions"]
    if terminal < published or not versions or snap["faces"].get("detected", 0) or retrain_busy():
        return False
    return time.time() - versions[-1]["at"] - (versions[-1]["duration_s"] or 0) > quiet


def predict_held_out(held: list[tuple[str, Path]], env: dict) -> dict:
    """Share of held-out illustrations named right by the most confident face, and by any face."""
    out = subprocess.run(
        [WAIFU, "predict", "--json", *(str(p) for _, p in held)], env=env, capture_output=True, text=True, timeout=900
    )
    by_path = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            by_path[entry["path"]] = entry
    best_right = any_right = no_face = 0
    for tag, path in held:
        faces = by_path.get(str(path), {}).get("faces", [])
        names = [(f["top"][0]["p"], f["top"][0]["name"]) for f in faces if f.get("top")]
        if not names:
            no_face += 1
            continue
        best_right += max(names)[1] == tag
        any_right += any(label == tag for _, label in names)
    n = len(held)
    return {"held_out": n, "best_face": best_right / n, "any_face": any_right / n, "no_face": no_face}


def main() -> int:
    args = parse_args()
    from tests.support.testdata import raw_images

    published, held = held_out(raw_images(), args.holdout, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="waifu-e2e-"))
    redis_url = os.environ.get("WAIFU_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    env = {
        **os.environ,
        "WAIFU_DATA_DIR": str(tmp / "data"),
        "WAIFU_DATABASE_URL": f"sqlite:///{tmp}/waifu.db",
        "WAIFU_BROKER_URL": redis_url,
        "WAIFU_REQUESTS_PER_SECOND": "5",
        "WAIFU_DOWNLOADS_PER_SECOND": "10",
        "WAIFU_POLL_INTERVAL_S": "60",
        "WAIFU_RETRAIN_INTERVAL_S": str(args.retrain_check),
        "WAIFU_BACKBONE_WEIGHTS": os.environ.get("WAIFU_BACKBONE_WEIGHTS", "none"),
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update(env)
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    tags = sorted({t for t, _ in published})
    started = time.time()
    with SiteThread(published) as url:
        env["WAIFU_DEFAULT_SITE_URL"] = os.environ["WAIFU_DEFAULT_SITE_URL"] = url
        subprocess.run([WAIFU, "characters", "add", *tags], env=env, check=True, capture_output=True)
        log = open(tmp / "run.log", "w")  # noqa: SIM115 (the service's whole life)
        service = subprocess.Popen([WAIFU, "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
        snap: dict = {}
        try:
            while time.time() - started < args.timeout:
                time.sleep(15)
                snap = snapshot()
                if service.poll() is not None:
                    print(f"waifu run exited with {service.returncode}; see {tmp / 'run.log'}")
                    break
                v = snap["versions"]
                print(
                    f"{time.time() - started:6.0f}s posts {snap['posts']} faces {snap['faces']} "
                    f"versions {[(x['id'], x['status'], x['round'], x['accuracy']) for x in v]}",
                    flush=True,
                )
                if steady(snap, len(published), args.quiet):
                    break
        finally:
            service.send_signal(signal.SIGINT)
            try:
                service.wait(120)
            except subprocess.TimeoutExpired:
                service.kill()
        elapsed = time.time() - started
    prediction = predict_held_out(held, env)
    ready = sum(snap["sources"].values()) if snap else 0
    result = {
        "published": len(published),
        "seconds_to_steady": round(elapsed),
        "posts": snap.get("posts"),
        "faces": snap.get("faces"),
        "label_sources": snap.get("sources"),
        "ambiguous_share": round(snap["sources"].get("ambiguous", 0) / ready, 3) if ready else None,
        "versions": snap.get("versions"),
        "predict": prediction,
    }
    print(json.dumps(result, indent=2, default=str))
    if args.keep:
        print(f"data kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
