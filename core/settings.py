"""Every setting of the service, read from the environment (prefix ``WAIFU_``) and an optional ``.env``.

This is the contract other tools rely on: the names here are documented in the README's
configuration table and used by docker-compose.yml.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.sites import DEFAULT_SITE, KNOWN_SITES, Site, configured

DEFAULT_SITE_URL = KNOWN_SITES[DEFAULT_SITE].url
ENV_PREFIX = "WAIFU_"


def _renamed(name: str, old: str) -> AliasChoices:
    """The variables of a renamed field: its own name first (it wins when both are set), then the old name,
    still read because scripts and compose files use it."""
    return AliasChoices(f"{ENV_PREFIX}{name.upper()}", f"{ENV_PREFIX}{old.upper()}")


class SiteOverride(BaseModel):
    """What settings may change about a known site: where it is, and the credentials it wants."""

    url: str | None = None
    api_key: SecretStr | None = None  # secrets: repr() and logs show '**********'
    user_id: SecretStr | None = None


class Settings(BaseSettings):
    # a refused value is never repeated in the error: it may be a URL with its password, or a key
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", hide_input_in_errors=True, validate_by_name=True
    )

    # --- storage -------------------------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="Where images, faces, models and the SQLite file live")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: a SQLite file `waifu.db` under the data dir"
    )
    sqlite_busy_timeout_s: float = Field(
        30.0,
        validation_alias=_renamed("sqlite_busy_timeout_s", "sqlite_busy_timeout"),
        gt=0,
        description="Seconds a SQLite writer waits for the lock before 'database is locked' (then retried)",
    )

    # --- broker --------------------------------------------------------------------------------
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL of the Celery broker")
    embedded_redis: bool = Field(
        True, description="`waifu run` starts an embedded Redis when the broker is unreachable"
    )

    # --- sites (Gelbooru-0.2 APIs, see core.sites) ----------------------------------------------
    default_site_url: str = Field(
        DEFAULT_SITE_URL,
        validation_alias=_renamed("default_site_url", "safebooru_url"),
        description="Base URL of the default site (safebooru)",
    )
    api_key: SecretStr | None = Field(None, description="Gelbooru-0.2 `api_key` for every site without its own")
    user_id: SecretStr | None = Field(None, description="Gelbooru-0.2 `user_id` for every site without its own")
    sites: dict[str, SiteOverride] = Field(
        default_factory=dict,
        description='Per-site overrides as JSON, e.g. {"gelbooru": {"api_key": "...", "user_id": "..."}}',
    )
    requests_per_second: float = Field(1.0, gt=0, description="Ceiling for all requests to the API host")
    page_size: int = Field(100, ge=1, le=1000, description="Posts per API request (safebooru: max 100)")
    backfill_pages: int = Field(3, ge=0, description="Pages a tag's first sync walks back (0: none)")
    deep_backfill_pages: int = Field(
        1,
        ge=0,
        description="Pages each poll walks further back for a character under WAIFU_MIN_TRAIN_FACES labelled "
        "training faces with no post still in the pipeline, until its oldest post (0: never; none either "
        "when WAIFU_BACKFILL_PAGES is 0)",
    )
    poll_interval_s: float = Field(
        300.0,
        validation_alias=_renamed("poll_interval_s", "poll_interval"),
        gt=0,
        description="Seconds between two polls of every tag",
    )
    api_retries: int = Field(5, ge=0, description="Retries of one API request on 429/5xx/malformed pages")
    api_backoff_s: float = Field(
        1.0,
        validation_alias=_renamed("api_backoff_s", "api_backoff"),
        ge=0,
        description="First backoff delay in seconds (doubles, jittered)",
    )
    api_backoff_max_s: float = Field(
        60.0,
        validation_alias=_renamed("api_backoff_max_s", "api_backoff_max"),
        ge=0,
        description="Cap on one backoff or Retry-After wait",
    )
    http_timeout_s: float = Field(
        30.0,
        validation_alias=_renamed("http_timeout_s", "http_timeout"),
        gt=0,
        description="Seconds before one HTTP request is abandoned",
    )
    api_max_page_bytes: int = Field(
        16 * 1024 * 1024,
        gt=0,
        description="Size cap of one API page (bytes, decoded); a larger page is refused and the error recorded "
        "on the tag",
    )
    extra_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="More hosts downloads may come from (comma separated)"
    )

    # --- downloads -----------------------------------------------------------------------------
    downloads_per_second: float = Field(2.0, gt=0, description="Per-host download ceiling, all io workers")
    max_download_bytes: int = Field(50 * 1024 * 1024, gt=0, description="Size cap of one downloaded file")
    max_image_pixels: int = Field(80_000_000, gt=0, description="Pixel cap against decompression bombs")
    download_retries: int = Field(4, ge=0, description="Retries of a download on 429/5xx/network errors")
    download_backoff_s: float = Field(
        5.0,
        validation_alias=_renamed("download_backoff_s", "download_backoff"),
        ge=0,
        description="First retry delay of a download (doubles)",
    )
    max_redirects: int = Field(5, ge=0, description="Redirect hops followed (each checked against the list)")
    download_min_rate: float = Field(
        65536.0,
        gt=0,
        description="Slowest average rate in bytes/s a download may keep: one file gets WAIFU_HTTP_TIMEOUT_S plus its "
        "announced size (else WAIFU_MAX_DOWNLOAD_BYTES) divided by this rate, then it is abandoned and retried",
    )
    local_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["localhost"],
        description="Allowed host names that may resolve to a loopback, private or link-local address (a local "
        "mirror); any other name that does is refused. An address written as a site's host (the fake site's "
        "127.0.0.1) is taken as written (comma separated)",
    )

    # --- recovery ------------------------------------------------------------------------------
    stuck_after_s: float = Field(
        120.0,
        validation_alias=_renamed("stuck_after_s", "stuck_after"),
        gt=0,
        description="Seconds an unclaimed row may wait with no queued message before reconcile",
    )
    reconcile_interval_s: float = Field(
        60.0,
        validation_alias=_renamed("reconcile_interval_s", "reconcile_interval"),
        gt=0,
        description="Seconds between two reconcile runs (beat)",
    )
    claim_timeout_s: float = Field(
        120.0,
        validation_alias=_renamed("claim_timeout_s", "claim_timeout"),
        gt=0,
        description="Seconds a worker's claim on a row holds; a killed worker's row is retaken after it",
    )
    visibility_timeout_s: float = Field(
        3600.0,
        validation_alias=_renamed("visibility_timeout_s", "visibility_timeout"),
        gt=0,
        description="Seconds before Redis redelivers an unacknowledged message (Celery's default)",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="Deliveries of one step a row may claim with no outcome (a time limit, a crashed or killed "
        "worker); the next one fails the row with the reason, which ends any redelivery loop",
    )
    download_time_limit_s: float = Field(
        900.0, gt=0, description="Hard time limit of one download task (seconds; the soft limit is 90 % of it)"
    )
    detect_time_limit_s: float = Field(
        60.0, gt=0, description="Hard time limit of one face detection task: its process is ended, a new one started"
    )
    crop_time_limit_s: float = Field(30.0, gt=0, description="Hard time limit of one crop task (seconds)")
    reconcile_time_limit_s: float = Field(300.0, gt=0, description="Hard time limit of one reconcile run (seconds)")
    retrain_time_limit_s: float = Field(
        4 * 3600.0, gt=0, description="Hard time limit of one retrain or classify task (seconds)"
    )
    shutdown_grace_s: float = Field(
        30.0,
        gt=0,
        description="Seconds `waifu worker` and `waifu run` wait for running tasks after SIGTERM; then the workers "
        "and their pool processes are killed (their rows are taken up again)",
    )
    retry_after_max_s: float = Field(
        600.0,
        validation_alias=_renamed("retry_after_max_s", "retry_after_max"),
        ge=0,
        description="Cap on any wait a server asks for with Retry-After (API and downloads)",
    )
    run_restart_limit: int = Field(
        5,
        ge=0,
        description="Restarts of one crashed child of `waifu run` / `waifu worker` allowed within "
        "run_restart_window_s (with a growing delay); past that everything stops. 0: a crash stops everything",
    )
    run_restart_window_s: float = Field(
        600.0, gt=0, description="The window over which run_restart_limit counts a child's restarts"
    )
    stall_after_s: float = Field(
        900.0,
        gt=0,
        description="Seconds a step may hand no row on while rows wait for it before `waifu status` shows a "
        "stall and the healthcheck of its worker fails (above any step's time limit and Retry-After wait)",
    )

    # --- faces (face pipeline) -----------------------------------------------------------------
    detector: str = Field("both", description="`animeface`, `lbpcascade` or `both`")
    lbpcascade_path: Path | None = Field(
        None,
        description="Another copy of lbpcascade_animeface.xml (unset: the one shipped in the package, "
        "checked against its pinned sha256)",
    )
    detector_max_pixels: int = Field(
        250_000, ge=0, description="Detect on a copy of at most this many pixels, boxes mapped back (0: full size)"
    )
    detector_fallbacks: bool = Field(True, description="When nothing is found: retry upscaled, then rotated")
    detector_upscale: float = Field(2.0, ge=1, le=4, description="Upscale factor of the small-face fallback pass")
    detector_angles: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [-25.0, 25.0], description="Rotations (degrees) of the tilted-head fallback"
    )
    face_verify: bool = Field(
        True,
        description="Check every detection again (detect.verify); the ones judged not a face are kept as "
        "`filtered` faces with the reason, never cropped nor labelled",
    )
    image_time_limit_s: float = Field(
        60.0,
        gt=0,
        description="Seconds `waifu detect` and `waifu predict` give the face detection of one image (in a child "
        "process, killed on overrun); that image gets an error and the batch goes on",
    )
    test_stall_file: str = Field(
        "", description="Test hook: face detection of a file with this name never returns; empty in use"
    )
    face_size: int = Field(96, ge=16, le=1024, description="Side of the square face crops in pixels")
    face_margin: float = Field(0.2, ge=0, le=2, description="Crop margin around a face box, share of its side")
    test_fraction: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="Share of faces in the test split: per character for labelled faces, by hash for the others",
    )
    min_train_faces: int = Field(
        10,
        ge=1,
        description="Training faces a character needs before any of its faces goes to the test split; the "
        "status and models page warn about characters with fewer",
    )
    near_duplicate_distance: int = Field(
        6, ge=0, le=32, description="Max pHash Hamming distance for two faces to count as the same picture"
    )

    # --- training (retrain task) ---------------------------------------------------------------
    backbone_weights: str = Field(
        "imagenet",
        description="`imagenet` (Keras download cached under <data dir>/keras; when it cannot be had the retrain "
        "trains from scratch and records why), a local no-top MobileNetV2 weights file, or `none`",
    )
    weights_retry_s: float = Field(
        86400.0,
        ge=0,
        description="After a failed ImageNet weights download, seconds before a retrain tries again (remembered "
        "in the worker and beside the cache under <data dir>/keras)",
    )
    retrain_interval_s: float = Field(
        86400.0,
        validation_alias=_renamed("retrain_interval_s", "retrain_interval"),
        gt=0,
        description="Seconds between two scheduled retrain checks",
    )
    retrain_min_new_faces: int = Field(
        50, ge=0, description="Labelled faces that must arrive since the current model for a scheduled retrain"
    )
    weak_labels: bool = Field(
        True, description="After each retrain infer labels for ambiguous faces, before it doubt tag labels (labels)"
    )
    selftrain_max_rounds: int = Field(
        3,
        ge=0,
        description="Follow-up retrains in a row at most, each scheduled when the last retrain's inference "
        "pass changed the inferred labels enough (0: never)",
    )
    selftrain_min_change: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Share of the inferred labels a retrain's inference pass must change (new, relabelled or "
        "reverted) for a follow-up retrain",
    )
    train_epochs: int | None = Field(None, ge=1, description="Epochs of the CNN (default: the chosen design's)")
    train_threads: int | None = Field(None, ge=1, description="TensorFlow threads (default: 2)")
    train_cnn_budget_s: float = Field(
        100.0,
        ge=0,
        description="Seconds of CNN training a retrain aims at on 2 cores: its input size (64 or 48 px) "
        "and epochs follow the number of faces (0: always the full 64 px, 15-epoch design)",
    )

    # --- web page (`waifu web`) ------------------------------------------------------------------
    web_port: int = Field(
        8000, ge=0, le=65535, description="Port of the web page `waifu run` starts on 127.0.0.1 (0: no web page)"
    )
    web_user: str | None = Field(
        None, description="User name of the web page's login; required (with the password) off loopback"
    )
    web_password: SecretStr | None = Field(
        None, description="Password of the web page's login (also HTTP basic auth); required off loopback"
    )
    web_api_token: SecretStr | None = Field(
        None,
        description="Token scripts send as `Authorization: Bearer ...` to the web API (/api/...); at least 16 "
        "characters; no token: the API takes the page's login only",
    )
    web_predict_timeout_s: float = Field(
        60.0, gt=0, description="Seconds the web page and API wait for a picture's faces to be named"
    )

    web_secure_cookies: bool = Field(
        False, description="Mark the login cookies `Secure`: the page is reached over HTTPS (e.g. a TLS proxy)"
    )
    web_trust_proxy: bool = Field(
        False,
        description="Believe a reverse proxy's X-Forwarded-Proto (https makes the cookies Secure) and its last "
        "X-Forwarded-For address (the client the login throttle counts); only when nothing else reaches the port",
    )

    # --- operations ----------------------------------------------------------------------------
    log_level: str = Field("INFO", description="Log level of every process (read by core.logs at start-up)")

    @field_validator("detector_angles", mode="before")
    @classmethod
    def _split_angles(cls, value: object) -> object:
        if isinstance(value, str):
            return [float(a) for a in value.split(",") if a.strip()]
        return value

    @field_validator("extra_hosts", "local_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return value

    @field_validator("database_url")
    @classmethod
    def _looks_like_a_url(cls, value: str | None) -> str | None:
        # said here, by name, rather than as SQLAlchemy's "could not parse" later (which quotes the value)
        if value is None or not value.strip():
            return None  # empty: the default SQLite file, as before
        if not re.match(r"[A-Za-z][A-Za-z0-9+]*://", value):
            raise ValueError("not a database URL (sqlite:///path or postgresql://user:password@host/db)")
        return value

    @field_validator("broker_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not re.match(r"(redis|rediss|unix)://", value):
            raise ValueError("not a Redis URL (redis://[:password@]host:port/db, rediss://... or unix://...)")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        import logging

        if value.strip().upper() not in logging.getLevelNamesMapping():
            raise ValueError("not a log level (DEBUG, INFO, WARNING, ERROR or CRITICAL)")
        return value.strip().upper()

    @field_validator("default_site_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    # --- derived -------------------------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'waifu.db').resolve()}"

    def site(self, name: str = DEFAULT_SITE) -> Site:
        """A known site with this configuration's URL and credentials applied."""
        if name not in KNOWN_SITES:
            raise ValueError(f"unknown site {name!r}; known: {', '.join(sorted(KNOWN_SITES))}")
        override = self.sites.get(name) or SiteOverride()
        url = override.url or (self.default_site_url if name == DEFAULT_SITE else None)
        return configured(
            KNOWN_SITES[name],
            url=url,
            api_key=_secret(override.api_key or self.api_key),
            user_id=_secret(override.user_id or self.user_id),
        )

    @property
    def all_sites(self) -> list[Site]:
        return [self.site(name) for name in KNOWN_SITES]

    @property
    def api_host(self) -> str:
        return self.site().api_host

    def hosts_for(self, site: str = DEFAULT_SITE) -> frozenset[str]:
        """Hosts a download of one site's post may touch: that site's API and file hosts, and the extras."""
        return frozenset(h for h in {*self.site(site).hosts, *self.extra_hosts} if h)

    @property
    def allowed_hosts(self) -> frozenset[str]:
        """The allow-list of the default site (see hosts_for)."""
        return self.hosts_for(DEFAULT_SITE)

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def faces_dir(self) -> Path:
        return self.data_dir / "faces"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"


def settings_problem(exc: Exception) -> str:
    """One line per bad setting, each naming its variable, from what pydantic(-settings) raised."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    if isinstance(exc, ValidationError):
        lines = []
        for error in exc.errors(include_url=False):
            loc = error.get("loc") or ("?",)
            name = _variable(str(loc[0]))
            where = "".join(f"[{part!r}]" for part in loc[1:])
            lines.append(f"bad setting {name}{where}: {error.get('msg', 'invalid value')}")
        return "\n".join(lines)
    if isinstance(exc, SettingsError):  # a JSON value that is not JSON: the message names the field
        field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else "?"
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        return f"bad setting WAIFU_{field.upper()}: not valid JSON{cause}"
    return f"bad settings: {exc}"


def _variable(loc: str) -> str:
    """The variable an error's location stands for; a renamed setting (located by its first alias) also gives
    its old name, which may be the one that was set."""
    if not loc.upper().startswith(ENV_PREFIX):
        return f"{ENV_PREFIX}{loc.upper()}"
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices) and str(alias.choices[0]).upper() == loc.upper():
            return " or ".join(str(choice).upper() for choice in alias.choices)
    return loc.upper()


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings_cache() -> None:
    """Tests and the CLI change the environment; this makes the next get_settings() re-read it."""
    get_settings.cache_clear()
