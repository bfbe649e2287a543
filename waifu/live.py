"""What `waifu run` shows while it runs: a summary redrawn in place, not the children's log lines.

Stalled steps (waifu.stalls), posts per state and per character, faces per state and label source, rates per
minute, queue lengths, the latest failures grouped by reason, the next poll, and whether each child still
runs. Everything comes from `waifu.status.collect_status` (the same query as `waifu status`, in a read-only
session). On a terminal the screen is redrawn in place (rich's Live); anywhere else (CI, a pipe, a file) one
plain line per interval.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from core.redact import mask_url
from core.settings import Settings

RATE_WINDOW = 60.0  # seconds of history a rate is computed over
PLAIN_EVERY = 10.0  # seconds between two plain lines (not a terminal)
FAILURE_ROWS = 5
STATE_STYLE = {"failed": "red", "skipped": "yellow", "done": "green", "discovered": "cyan", "ready": "green"}


class ChildLike(Protocol):
    name: str

    @property
    def state(self) -> str: ...


class RateMeter:
    """Per-minute rates of growing counts, from the samples of the last RATE_WINDOW seconds."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self.samples: deque[tuple[float, dict[str, int]]] = deque()

    def add(self, at: float, counts: dict[str, int]) -> dict[str, float | None]:
        self.samples.append((at, counts))
        while len(self.samples) > 2 and at - self.samples[1][0] >= self.window:
            self.samples.popleft()  # keep one sample at least a window old, so the span covers the window
        first_at, first = self.samples[0]
        span = at - first_at
        if span < 1.0:
            return dict.fromkeys(counts)
        return {k: (v - first.get(k, 0)) * 60.0 / span for k, v in counts.items()}


@dataclass
class Snapshot:
    """Everything one redraw shows."""

    data: dict[str, Any] | None  # collect_status's answer, None when it failed
    error: str | None
    rates: dict[str, float | None]
    children: list[tuple[str, str]]  # (name, "running" | "exited CODE")
    log_path: Path
    now: datetime
    uptime: float
    broker: str


def _when(iso: str | None) -> datetime | None:
    if not iso:
        return None
    at = datetime.fromisoformat(iso)
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def next_poll_text(s: Snapshot) -> str:
    data = s.data or {}
    if not data.get("characters"):
        return 'no characters tracked: waifu characters add TAG (or make run CHARACTERS="TAG ...")'
    at = _when(data.get("next_poll_at"))
    if at is None:
        return "first poll under way"
    local = at.astimezone().strftime("%H:%M:%S")
    left = (at - s.now).total_seconds()
    return f"{local} (in {_duration(left)})" if left > 0 else f"{local} (polling now)"


def _counts(counts: Mapping[str, int | str]) -> Text:
    text = Text()
    for i, (state, n) in enumerate(counts.items()):
        if i:
            text.append("  ")
        text.append(f"{state} ", style="dim")
        text.append(str(n), style=STATE_STYLE.get(state, "") if n else "")
    return text


def stall_lines(data: dict[str, Any]) -> list[RenderableType]:
    """Stalled steps (waifu.stalls) on top of the screen, one sentence each."""
    lines: list[RenderableType] = [
        Text(f"STALLED {stall['text']}", style="bold red") for stall in data.get("stalls") or []
    ]
    return [*lines, Text()] if lines else []


def render_screen(s: Snapshot) -> RenderableType:
    """The live screen (a rich renderable)."""
    head = Text.assemble(
        ("waifu run", "bold"), f"  up {_duration(s.uptime)}  broker {s.broker}  ", ("Ctrl-C stops everything", "dim")
    )
    logs = Text.assemble(("full logs: ", "dim"), str(s.log_path))
    parts: list[RenderableType] = [head, logs, Text()]
    if s.data is None:
        parts.append(Text(f"status unavailable: {s.error}", style="red"))
    else:
        data = s.data
        faces = data["faces"]
        parts += stall_lines(data)
        grid = Table.grid(padding=(0, 2))
        for _ in range(3):
            grid.add_column()
        grid.add_row(
            Text(f"posts {data['total']}", style="bold"),
            _counts(data["posts"]),
            Text(f"{_rate(s.rates.get('done'))} done/min", style="bold"),
        )
        grid.add_row(
            Text(f"faces {sum(faces['states'].values())}", style="bold"),
            _counts(faces["states"])
            + Text("   labels: ", style="dim")
            + _counts(
                {k: faces["label_sources"].get(k, 0) for k in ("tag", "manual", "inferred", "ambiguous")}
                | {"doubtful": faces.get("doubtful", 0)}
            ),
            Text(f"{_rate(s.rates.get('ready'))} ready/min", style="bold"),
        )
        queues = {q: ("?" if n is None else n) for q, n in data["queues"].items()}
        grid.add_row(Text("queues", style="bold"), _counts(queues), Text(""))
        grid.add_row(Text("next poll", style="bold"), Text(next_poll_text(s)), Text(""))
        parts += [grid, Text()]

        if data["characters"]:
            table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
            table.add_column("character", no_wrap=True)
            for state in data["posts"]:
                table.add_column(state, justify="right")
            table.add_column("faces train/test", justify="right")
            for tag, counts in data["characters"].items():
                labelled = faces["per_character"].get(tag, {})
                table.add_row(
                    tag,
                    *(str(counts.get(state, 0)) for state in data["posts"]),
                    f"{labelled.get('train', 0)}/{labelled.get('test', 0)}",
                )
            parts += [table, Text()]

        failures = data.get("recent_failures") or []
        if failures:
            table = Table(
                box=None,
                padding=(0, 1),
                show_edge=False,
                header_style="bold",
                title="latest failures",
                title_justify="left",
                title_style="bold red",
            )
            table.add_column("count", justify="right", style="red")
            table.add_column("of")
            table.add_column("reason", overflow="fold")
            table.add_column("last", justify="right")
            for f in failures[:FAILURE_ROWS]:
                at = _when(f["last_at"])
                ago = f"{_duration((s.now - at).total_seconds())} ago" if at else ""
                table.add_row(str(f["count"]), f["kind"], f["reason"], ago)
            parts += [table, Text()]

    children = Text("children  ", style="bold")
    for name, state in s.children:
        mark, style = {"running": ("● ", "green"), "exited 0": ("○ ", "dim")}.get(state, ("✖ ", "red"))
        children.append(mark, style=style)
        children.append(f"{name} {state}   ", style="" if state != "exited 0" else "dim")
    parts.append(children)
    return Group(*parts)


def plain_line(s: Snapshot) -> str:
    """One line of the same summary, for logs and pipes."""
    stamp = s.now.astimezone().strftime("%H:%M:%S")
    running = sum(state == "running" for _, state in s.children)
    children = f"children {running}/{len(s.children)} running"
    if s.data is None:
        return f"[{stamp}] status unavailable: {s.error} | {children}"
    data = s.data
    posts = " ".join(f"{state} {n}" for state, n in data["posts"].items())
    faces = data["faces"]
    ready = faces["states"].get("ready", 0)
    sources = " ".join(f"{k} {v}" for k, v in sorted(faces["label_sources"].items()))
    queues = " ".join(f"{q} {'?' if n is None else n}" for q, n in data["queues"].items())
    characters = " ".join(
        f"{tag} {counts.get('done', 0)}/{sum(counts.values())}" for tag, counts in data["characters"].items()
    )
    failures = "; ".join(f"{f['count']}x {f['reason']}" for f in (data.get("recent_failures") or [])[:3])
    stalls = "".join(f"STALLED {stall['text']} | " for stall in data.get("stalls") or [])
    return (
        f"[{stamp}] {stalls}posts {data['total']} ({posts}) {_rate(s.rates.get('done'))} done/min"
        f" | faces ready {ready} ({sources or 'none'}) {_rate(s.rates.get('ready'))} ready/min"
        f" | queues {queues} | characters done/all {characters or 'none'}"
        f" | next poll {next_poll_text(s)}" + (f" | failures {failures}" if failures else "") + f" | {children}"
    )


class RunView:
    """Collects a snapshot on every `tick` and shows it: in place on a terminal, else a line per interval."""

    def __init__(
        self,
        settings: Settings,
        console: Console,
        log_path: Path,
        children: Sequence[ChildLike],
        embedded_redis: bool = False,
        plain_every: float = PLAIN_EVERY,
    ) -> None:
        self.settings = settings
        self.console = console
        self.log_path = log_path
        self.children = children
        self.broker = ("embedded " if embedded_redis else "") + mask_url(settings.broker_url)
        self.plain_every = plain_every
        self.rates = RateMeter()
        self.started = time.monotonic()
        self.live: Live | None = None
        self.last_plain = float("-inf")
        self.last: Snapshot | None = None

    def __enter__(self) -> RunView:
        if self.console.is_terminal:
            self.live = Live(
                console=self.console,
                auto_refresh=False,
                transient=False,
                vertical_overflow="crop",
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            if self.last is not None:
                self.tick(final=True)
            self.live.stop()
        elif self.last is not None:
            self.tick(final=True)

    def snapshot(self) -> Snapshot:
        from waifu.status import collect_status

        data, error = None, None
        try:
            data = collect_status(self.settings)
        except Exception as exc:  # the screen reports a database it cannot read; it never stops the service
            first_line = (str(exc).strip().splitlines() or [""])[0]  # SQLAlchemy appends the SQL on more lines
            error = f"{type(exc).__name__}: {first_line}"
        now = time.monotonic()
        rates: dict[str, float | None] = {}
        if data is not None:
            rates = self.rates.add(
                now, {"done": data["posts"]["done"], "ready": data["faces"]["states"].get("ready", 0)}
            )
        return Snapshot(
            data,
            error,
            rates,
            [(c.name, c.state) for c in self.children],
            self.log_path,
            datetime.now(UTC),
            now - self.started,
            self.broker,
        )

    def tick(self, final: bool = False) -> None:
        self.last = snap = self.snapshot()
        if self.live is not None:
            self.live.update(render_screen(snap), refresh=True)
        elif final or time.monotonic() - self.last_plain >= self.plain_every:
            self.last_plain = time.monotonic()
            self.console.print(plain_line(snap), markup=False, highlight=False, soft_wrap=True)
