"""The download step on a post row: claim it, fetch and verify with no transaction open, then store the
result only if the row is still ours (db.claims). Every refusal is recorded on the row with its reason.

`download_post` is the plain function the `worker.tasks.download` shell runs; it never raises for a bad
input or a bad answer from the site.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

from sqlmodel import Session, col, select

from core.errors import Refused, Retryable, Unavailable
from core.logs import kv
from core.outcome import StepOutcome
from core.settings import Settings
from db.claims import claim, new_token, release, state_of, still_claimed
from db.models import Post, PostState, pk
from db.states import hand_over_reposts, transition
from download.fetch import Fetched, check_image_name, fetch
from download.verify import FORMAT_EXTENSIONS, verify_image

log = logging.getLogger("waifu.download")

STORED_STATES = (PostState.downloaded, PostState.detected, PostState.done)
WAITING = PostState.discovered


def stored_original(session: Session, post: Post) -> Post | None:
    """An earlier post with the same md5 whose file is stored makes this one a repost."""
    if not post.md5:
        return None  # an empty md5 would match every other empty one
    return session.exec(
        select(Post)
        .where(Post.md5 == post.md5, Post.id != post.id, col(Post.state).in_(STORED_STATES))
        .order_by(col(Post.id))
    ).first()


def backoff(settings: Settings, attempts: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return retry_after
    return settings.download_backoff_s * (2 ** max(0, attempts - 1)) * random.uniform(0.8, 1.2)


def download_post(post_id: int, settings: Settings, token: str | None = None) -> StepOutcome:
    """Fetches, verifies and stores one post; records every outcome on its row."""
    token = token or new_token()
    post = claim(Post, post_id, WAITING, token, settings.claim_timeout_s, on_claim=count_attempt)
    if post is None:
        return state_of(Post, post_id)  # gone, past this step, or another worker has it now: nothing to do
    if post.state != WAITING:
        return StepOutcome(PostState(post.state), post.reason)  # a repost of a stored file: skipped at once
    attempts = post.attempts

    fetched: Fetched | None = None
    started = time.time()
    try:
        check_image_name(post.image)
        settings.images_dir.mkdir(parents=True, exist_ok=True)
        # a post's file may come only from its own site's hosts (core.sites) and the configured extras
        fetched = fetch(post.file_url, settings, settings.images_dir, settings.hosts_for(post.site))
        md5 = (post.md5 or "").strip().lower()
        if fetched.md5 != md5:
            raise Refused(f"md5 mismatch: API announced {md5 or 'nothing'}, file is {fetched.md5}")
        fmt, width, height = verify_image(fetched.path, settings)
        # named by the hash we computed ourselves: nothing from the remote side reaches the path
        relative = Path("images") / fetched.md5[:2] / f"{fetched.md5}.{FORMAT_EXTENSIONS[fmt]}"
        (settings.data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(fetched.path, settings.data_dir / relative)
        fetched = None
        stored = record_stored(post_id, token, relative, width, height, settings)
        stored.work = (started, time.time())
        return stored
    except Refused as exc:
        return record_failed(post_id, token, str(exc))
    except (Retryable, Unavailable) as exc:
        retry_after = exc.retry_after if isinstance(exc, Retryable) else None
        if attempts <= settings.download_retries:
            delay = backoff(settings, attempts, retry_after)
            reason = f"retrying: {exc} (attempt {attempts} of {settings.download_retries + 1})"
            release(Post, post_id, token, reason)
            log.info(kv("retry", post=post_id, reason=reason, countdown=round(delay, 2)))
            return StepOutcome(PostState.discovered, reason=str(exc), retry_in=delay)
        return record_failed(post_id, token, f"gave up after {attempts} attempts: {exc}")
    except Exception as exc:  # never lose a row to a bug: say what happened on it
        log.exception(kv("download crashed", post=post_id))
        return record_failed(post_id, token, f"unexpected error: {type(exc).__name__}: {exc}")
    finally:
        if fetched is not None:
            fetched.path.unlink(missing_ok=True)


def count_attempt(session: Session, post: Post) -> None:
    post.attempts += 1
    original = stored_original(session, post)
    if original is not None:
        skip_as_duplicate(post, original)


def skip_as_duplicate(post: Post, original: Post) -> None:
    transition(post, PostState.skipped, f"duplicate of {original.label} (same md5 {post.md5})")
    post.duplicate_of = original.id


def record_failed(post_id: int, token: str, reason: str) -> StepOutcome:
    """The post fails with `reason`; a repost that waited on it is collected in its place."""
    with still_claimed(Post, post_id, WAITING, token) as (session, post):
        if post is None:
            return state_of(Post, post_id)
        transition(post, PostState.failed, reason)
        heir = hand_over_reposts(session, post)
        return StepOutcome(post.state, post.reason, again_ids=[heir] if heir else [])


def record_stored(post_id: int, token: str, relative: Path, width: int, height: int, settings: Settings) -> StepOutcome:
    with still_claimed(Post, post_id, WAITING, token) as (session, post):
        if post is None:
            return state_of(Post, post_id)
        original = stored_original(session, post)  # another worker may have stored the same file meanwhile
        if original is not None:
            skip_as_duplicate(post, original)
            return StepOutcome(post.state, post.reason)
        post.stored_path = relative.as_posix()
        post.file_size = (settings.data_dir / relative).stat().st_size
        post.width, post.height = post.width or width, post.height or height
        transition(post, PostState.downloaded)
        return StepOutcome(post.state, next_ids=[pk(post)])
