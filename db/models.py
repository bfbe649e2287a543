"""SQLModel tables: the single source of truth for every image's state."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import ClassVar, Protocol

from sqlalchemy import BigInteger, Boolean, Column, ForeignKey, Index, Integer, String, Text, UniqueConstraint, false
from sqlmodel import Field, SQLModel, col

from core.sites import DEFAULT_SITE

# BIGINT, but INTEGER on SQLite: only an INTEGER PRIMARY KEY is the rowid there, and so numbered by itself
ID = BigInteger().with_variant(Integer(), "sqlite")
# a tracked character's tag, extra terms and ratings: PostgreSQL refuses a longer value, so it is refused as input first
TAG_CHARS, EXTRA_TERMS_CHARS, RATINGS_CHARS = 255, 500, 100


class _Stored(Protocol):
    id: int | None


def pk(row: _Stored) -> int:
    """A stored row's id (None only before its first flush, when using it is a bug)."""
    if row.id is None:
        raise ValueError(f"{type(row).__name__} has no id before it is flushed")
    return row.id


def utcnow() -> datetime:
    """Aware UTC; SQLModel's UTCDateTime stores it as UTC on every backend (SQLite keeps no zone)."""
    return datetime.now(UTC)


class PostState(StrEnum):
    discovered = "discovered"  # listed by the API, download enqueued
    downloaded = "downloaded"  # file stored and verified
    detected = "detected"  # faces found (face pipeline)
    done = "done"  # every face handled
    failed = "failed"  # refused or retries exhausted; `reason` says why
    skipped = "skipped"  # deliberately not processed (duplicate md5, filtered rating)


TERMINAL_STATES = frozenset({PostState.done, PostState.failed, PostState.skipped})


class Character(SQLModel, table=True):
    """A tag tracked on one site (core.sites): the same tag on two sites is two characters."""

    __tablename__: ClassVar[str] = "character"
    __table_args__ = (UniqueConstraint("site", "tag", name="uq_character_site_tag"),)

    id: int | None = Field(default=None, primary_key=True)
    site: str = Field(default=DEFAULT_SITE, sa_column=Column(String(32), nullable=False, default=DEFAULT_SITE))
    tag: str = Field(sa_column=Column(String(TAG_CHARS), nullable=False, index=True))
    # extra search terms appended to the tag, e.g. "-animated -comic"
    extra_terms: str = Field(default="", sa_column=Column(String(EXTRA_TERMS_CHARS), nullable=False, default=""))
    # comma-separated ratings kept (e.g. "general,safe"); empty keeps every rating
    ratings: str = Field(default="", sa_column=Column(String(RATINGS_CHARS), nullable=False, default=""))
    created_at: datetime = Field(default_factory=utcnow, nullable=False)

    @property
    def rating_set(self) -> frozenset[str]:
        return frozenset(r.strip().lower() for r in self.ratings.split(",") if r.strip())


class PostCharacter(SQLModel, table=True):
    """Links a post to every tracked character whose tag it carries."""

    __tablename__: ClassVar[str] = "post_character"

    post_id: int = Field(sa_column=Column(BigInteger, ForeignKey("post.id", ondelete="CASCADE"), primary_key=True))
    character_id: int = Field(
        sa_column=Column(Integer, ForeignKey("character.id", ondelete="CASCADE"), primary_key=True)
    )


class Post(SQLModel, table=True):
    __tablename__: ClassVar[str] = "post"
    __table_args__ = (UniqueConstraint("site", "remote_id", name="uq_post_site_remote_id"),)

    # our own key: posts of several sites share the table (rows older than sites kept their safebooru id)
    id: int | None = Field(default=None, sa_column=Column(ID, primary_key=True, autoincrement=True))
    # where it was listed, and the site's own id: what makes the scraper's upsert idempotent. None for a
    # row no site listed (made by hand, tests)
    site: str = Field(default=DEFAULT_SITE, sa_column=Column(String(32), nullable=False, default=DEFAULT_SITE))
    remote_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    md5: str = Field(sa_column=Column(String(32), nullable=False, index=True))
    file_url: str = Field(sa_column=Column(Text, nullable=False))
    image: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    directory: str = Field(default="", sa_column=Column(String(255), nullable=False, default=""))
    width: int | None = None
    height: int | None = None
    rating: str = Field(default="", sa_column=Column(String(32), nullable=False, default=""))
    score: int | None = None
    tags: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    source: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    change: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))

    state: str = Field(default=PostState.discovered, sa_column=Column(String(16), nullable=False, index=True))
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    attempts: int = Field(default=0, nullable=False)
    duplicate_of: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))

    # filled by the download: bytes on disk, path relative to the data dir (named by content hash)
    file_size: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    stored_path: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # filled by face detection: how many faces the image holds (0 is a valid, final answer)
    faces: int | None = None
    # who works on this row now (a task id) and until when (see db.claims)
    claim_token: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    claimed_until: datetime | None = None
    # deliveries of the current step claimed with no outcome yet (a time limit, a crashed worker): the row
    # fails once WAIFU_MAX_ATTEMPTS are spent (db.claims)
    claims: int = Field(default=0, sa_column=Column(Integer, nullable=False, default=0, server_default="0"))

    created_at: datetime = Field(default_factory=utcnow, nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, nullable=False, index=True)

    @property
    def tag_set(self) -> frozenset[str]:
        return frozenset(self.tags.split())

    @property
    def label(self) -> str:
        """How a person finds the post: by the site's own id ("safebooru post 1001") where it has one."""
        return f"{self.site} post {self.remote_id}" if self.remote_id is not None else f"post {self.id}"


class ScrapeCursor(SQLModel, table=True):
    """How far one tag's polling on one site has got. `newest_id`: the newest id stored (a catch-up walks
    down to it); `oldest_id`: the tag's floor, the oldest post its first sync stored (or, with no backfill,
    one above the newest post when it started). A listed post between the two that is no row is still
    taken (scraper.poller). `history_done`: a walk back reached the tag's oldest post (a page came back not
    full): nothing lies below the floor, and a small character's deeper backfill has nothing left to walk."""

    __tablename__: ClassVar[str] = "scrape_cursor"

    site: str = Field(default=DEFAULT_SITE, sa_column=Column(String(32), primary_key=True, default=DEFAULT_SITE))
    tag: str = Field(sa_column=Column(String(255), primary_key=True))
    newest_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    oldest_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    backfill_done: bool = Field(default=False, nullable=False)
    history_done: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, default=False, server_default=false())
    )
    requests: int = Field(default=0, nullable=False)
    last_poll_at: datetime | None = None
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class FaceState(StrEnum):
    detected = "detected"  # a box exists; the 96x96 crop is not written yet
    ready = "ready"  # the crop file exists
    rejected = "rejected"  # a person said this is not a usable face
    # the face check (detect.verify) judged the detection not a face: kept, never cropped, labelled nor
    # counted in the post's `faces`; `reason` says why
    filtered = "filtered"
    failed = "failed"  # the crop could not be made; `reason` says why


class LabelSource(StrEnum):
    tag = "tag"  # the post names exactly one tracked character and holds exactly one face
    ambiguous = "ambiguous"  # several characters or several faces: kept, not trained on
    manual = "manual"  # set by `waifu faces label`
    # labels.weak: the current model picked this face as the post's tagged character with a clear margin
    # over the post's other faces; recomputed after every retrain, trained on in the train split only
    inferred = "inferred"


class Split(StrEnum):
    train = "train"
    test = "test"


class Face(SQLModel, table=True):
    """One detected face; every detection is kept, whatever its label."""

    __tablename__: ClassVar[str] = "face"

    id: int | None = Field(default=None, primary_key=True)
    post_id: int = Field(
        sa_column=Column(BigInteger, ForeignKey("post.id", ondelete="CASCADE"), index=True, nullable=False)
    )
    # the detection, in the original image's pixels
    detector: str = Field(sa_column=Column(String(32), nullable=False))
    score: float | None = None
    x: int
    y: int
    w: int
    h: int
    # the square, margin-expanded crop clamped to the image: left, top, right, bottom
    crop_left: int
    crop_top: int
    crop_right: int
    crop_bottom: int

    state: str = Field(default=FaceState.detected, sa_column=Column(String(16), nullable=False, index=True))
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    path: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # relative to the data dir
    sha256: str | None = Field(default=None, sa_column=Column(String(64), nullable=True, index=True))
    phash: str | None = Field(default=None, sa_column=Column(String(16), nullable=True, index=True))
    duplicate_of: int | None = None  # the earlier face this one is a near-duplicate of

    label: str | None = Field(default=None, sa_column=Column(String(255), nullable=True, index=True))
    label_source: str | None = Field(default=None, sa_column=Column(String(16), nullable=True))
    split: str | None = Field(default=None, sa_column=Column(String(8), nullable=True, index=True))
    # the classifier's guess for ambiguous faces: a suggestion, never a label
    suggestion: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    suggestion_score: float | None = None
    # inferred labels (labels.weak): the margin by which this face beat the post's other faces
    inferred_margin: float | None = None
    # a `tag` label a model trained without this face calls another character (labels.weak): why, and that
    # model's probability for the other character; never trained or evaluated on while set
    doubt: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    doubt_score: float | None = None
    # who works on this row now (a task id) and until when (see db.claims)
    claim_token: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    claimed_until: datetime | None = None
    # deliveries of the current step claimed with no outcome yet (a time limit, a crashed worker): the row
    # fails once WAIFU_MAX_ATTEMPTS are spent (db.claims)
    claims: int = Field(default=0, sa_column=Column(Integer, nullable=False, default=0, server_default="0"))

    created_at: datetime = Field(default_factory=utcnow, nullable=False)
    updated_at: datetime = Field(default_factory=utcnow, nullable=False, index=True)


class FaceLabelEvent(SQLModel, table=True):
    """One manual change of one face (`waifu faces label/reject`, the web page): its state, label and label
    source before and after, so it can be undone. A bulk action writes one row per face under one `action`."""

    __tablename__: ClassVar[str] = "face_label_event"

    id: int | None = Field(default=None, primary_key=True)
    action: str = Field(sa_column=Column(String(32), nullable=False, index=True))
    face_id: int = Field(
        sa_column=Column(Integer, ForeignKey("face.id", ondelete="CASCADE"), nullable=False, index=True)
    )
    origin: str = Field(default="cli", sa_column=Column(String(16), nullable=False, default="cli"))  # cli, web
    before_state: str = Field(sa_column=Column(String(16), nullable=False))
    before_label: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    before_source: str | None = Field(default=None, sa_column=Column(String(16), nullable=True))
    after_state: str = Field(sa_column=Column(String(16), nullable=False))
    after_label: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    after_source: str | None = Field(default=None, sa_column=Column(String(16), nullable=True))
    created_at: datetime = Field(default_factory=utcnow, nullable=False)
    undone_at: datetime | None = None


# the web page's faces grid: filters by label source or suggestion, pages by id (migration 0005)
Index("ix_face_source_state_id", col(Face.label_source), col(Face.state), col(Face.id))
Index("ix_face_suggestion", col(Face.suggestion))
Index("ix_face_suggestion_score", col(Face.suggestion_score))
# the faces grid's "doubtful" filter (migration 0007)
Index("ix_face_doubt_score", col(Face.doubt_score))


class FaceHashBand(SQLModel, table=True):
    """One byte of a ready face's 64-bit perceptual hash. Two hashes within 7 bits of each other agree
    on at least one of their 8 bytes (pigeonhole), so a near-duplicate lookup compares only the faces
    that share a band with the new one instead of every face in the collection."""

    __tablename__: ClassVar[str] = "face_hash_band"
    # SQLite: rows live in the primary-key b-tree, so a band's range scan reads each phash in place
    __table_args__ = {"sqlite_with_rowid": False}

    band: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    value: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    face_id: int = Field(
        sa_column=Column(Integer, ForeignKey("face.id", ondelete="CASCADE"), primary_key=True, index=True)
    )
    # the whole hash again: a lookup reads only this table (one index range per band), whatever the
    # database's planner would make of a join with `face`
    phash: str = Field(sa_column=Column(String(16), nullable=False))


class ModelStatus(StrEnum):
    current = "current"  # the model predictions use
    candidate = "candidate"  # trained, did not beat the current one (reason says by how much)
    retired = "retired"  # was current, replaced by a better one
    failed = "failed"  # training did not finish; reason says why


class ModelVersion(SQLModel, table=True):
    """One retrain: its metrics, data, settings and where its artifacts live."""

    __tablename__: ClassVar[str] = "model_version"

    id: int | None = Field(default=None, primary_key=True)
    status: str = Field(default=ModelStatus.candidate, sa_column=Column(String(16), nullable=False, index=True))
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    accuracy: float | None = None
    macro_f1: float | None = None
    current_accuracy: float | None = None  # the then-current model on the same test split, same run
    metrics: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))  # JSON
    counts: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))  # JSON: per class
    hyperparameters: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))  # JSON
    labelled_faces: int = 0  # labelled faces in the database when training started
    # the self-training loop (train.selftrain, migration 0009): inferred labels in this version's training set;
    # inferred labels the inference pass after it changed (new, relabelled or reverted); its place in a
    # chain of follow-up retrains (0: asked for by the beat, the CLI or the web page)
    inferred_trained: int | None = None
    inferred_changed: int | None = None
    loop_round: int = Field(default=0, sa_column=Column(Integer, nullable=False, default=0, server_default="0"))
    duration_s: float | None = None
    code_version: str = Field(default="", sa_column=Column(String(64), nullable=False, default=""))
    artifact_dir: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # relative to data dir
    created_at: datetime = Field(default_factory=utcnow, nullable=False)
