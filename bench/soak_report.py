"""What a soak run saw, and its verdict against issue 17's done criteria. Fed by bench/soak.py as the run goes
(row snapshots from the database, the run log's new lines, RSS from /proc, the chaos it did); `report()` can be
called at any time, so the file rewritten every minute tells what a stopped run saw.

Reading of rows is generic: a row's reason is matched against words a time limit leaves ("time limit", "did
not finish within", "timed out"...) whatever helper wrote it; tracebacks in the log count as seen when the
log line before them (or the block) names a post whose row records a reason, or when they fall in a chaos
window (a broker or database restart, expected connection errors, logged)."""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, text

from bench.soak_site import Published

TERMINAL = {"done", "failed", "skipped"}
TIME_LIMIT = re.compile(r"time ?limit|did not finish within|timed? ?out|TimeLimitExceeded|deadline", re.I)
WORKER_LOST = re.compile(r"WorkerLostError|exited with 'signal 9|exited prematurely", re.I)
POST_REF = re.compile(r"\bpost[= ](\d+)")
CHAOS_WINDOW = 120.0  # seconds after a restart/flush in which connection tracebacks are expected
RSS_GROWTH_LIMIT = 10.0
WARM_UP = 60.0  # seconds of a process's start left out of its first RSS window


@dataclass
class Traceback:
    at: float
    child: str
    context: str
    exception: str = ""
    lines: int = 0
    post: int | None = None


@dataclass
class Observer:
    db_url: str
    log_path: Path
    ledger: list[Published]
    recovery_bound: float
    lost_after: float  # a post is lost when it has no row this long after it was published
    started: float = field(default_factory=time.time)
    stuck_tag_after: float = 180.0  # a tag not polled this long, with no last_error, fails silently
    chaos: list[dict] = field(default_factory=list)
    rows: dict[int, dict] = field(default_factory=dict)  # remote id -> last seen row
    rows_by_db_id: dict[int, dict] = field(default_factory=dict)
    cursors: list[dict] = field(default_factory=list)
    longest_wait: dict[int, float] = field(default_factory=dict)  # remote id -> longest non-terminal wait seen
    state_since: dict[int, tuple[str, datetime]] = field(default_factory=dict)  # remote id -> (state, since)
    rss: dict[tuple[int, str], list[tuple[float, int]]] = field(default_factory=dict)
    tracebacks: list[Traceback] = field(default_factory=list)
    log_time_limits: list[str] = field(default_factory=list)
    log_worker_lost: list[str] = field(default_factory=list)
    hang_log: Path | None = None  # where the soak-only hook writes one line per hang it starts
    claimed_at_kill: dict[int, tuple[str, str]] = field(default_factory=dict)  # db id -> (state, updated_at)
    sample_errors: list[str] = field(default_factory=list)
    _log_offset: int = 0
    _open_tb: dict[str, Traceback] = field(default_factory=dict)
    _last_line: dict[str, str] = field(default_factory=dict)
    _engine: object = None

    # ------------------------------------------------------------------ samples ----------
    def note_chaos(self, name: str, detail: str = "") -> None:
        self.chaos.append(
            {"at": time.time(), "minute": round((time.time() - self.started) / 60, 2), "name": name, "detail": detail}
        )

    def sample_rows(self) -> None:
        if self._engine is None:
            self._engine = create_engine(self.db_url, connect_args=_connect_args(self.db_url), pool_pre_ping=True)
        query = text(
            "select id, remote_id, state, reason, attempts, updated_at, claim_token from post where site='safebooru'"
        )
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(query).mappings().all()
                cursors = conn.execute(text("select tag, newest_id, last_error, last_poll_at from scrape_cursor"))
                self.cursors = [dict(c) for c in cursors.mappings().all()]
        except Exception as exc:  # the database may be restarting (chaos) or not created yet
            self.sample_errors.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {str(exc)[:160]}")
            return
        now = datetime.now(UTC)
        for row in rows:
            row = dict(row)
            updated = _utc(row["updated_at"])
            row["updated_at"] = updated.isoformat() if updated else None
            if row["remote_id"] is not None:
                self.rows[row["remote_id"]] = row
            self.rows_by_db_id[row["id"]] = row
            rid = row["remote_id"]
            if rid is None or updated is None:
                continue
            # since when the row is in its state: a claim renewed or a redelivery touches `updated_at` without
            # progress, so the state's first sighting counts too
            known = self.state_since.get(rid)
            if known is None or known[0] != row["state"]:
                self.state_since[rid] = (row["state"], updated if known is None else min(updated, now))
            if row["state"] not in TERMINAL:
                wait = (now - self.state_since[rid][1]).total_seconds()
                self.longest_wait[rid] = max(self.longest_wait.get(rid, 0.0), wait)

    def snapshot_claims(self) -> None:
        """Rows a worker holds right now (before a SIGKILL): each must reach an outcome later."""
        for db_id, row in self.rows_by_db_id.items():
            if row.get("claim_token") and row["state"] not in TERMINAL:
                self.claimed_at_kill[db_id] = (row["state"], row["updated_at"])

    def sample_rss(self, roles: dict[int, str], extra: dict[int, str]) -> None:
        from bench.soak_services import rss_kib

        now = time.time()
        for pid, role in {**roles, **extra}.items():
            kib = rss_kib(pid)
            if kib is not None:
                self.rss.setdefault((pid, role), []).append((now, kib))

    def scan_log(self) -> None:
        """Reads the run log's new lines: tracebacks, time limits, lost workers, the soak hook's hangs."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self._log_offset += end
        now = time.time()
        for raw in data[:end].decode("utf-8", errors="replace").splitlines():
            child, sep, line = raw.partition(" | ")
            if not sep:
                child, line = "?", raw
            self._line(now, child, line)

    def _line(self, now: float, child: str, line: str) -> None:
        open_tb = self._open_tb.get(child)
        if open_tb is not None:
            if (
                line.startswith((" ", "\t"))
                or line.startswith(("Traceback", "During handling", "The above"))
                or (not line.strip())
            ):
                open_tb.lines += 1
                open_tb.post = open_tb.post or _post_ref(line)
                return
            open_tb.exception = line.strip()[:300]
            open_tb.post = open_tb.post or _post_ref(line)
            del self._open_tb[child]
        if line.startswith("Traceback (most recent call last)"):
            context = self._last_line.get(child, "")
            tb = Traceback(now, child, context[:300], post=_post_ref(context))
            self.tracebacks.append(tb)
            self._open_tb[child] = tb
            return
        if TIME_LIMIT.search(line) and ("ERROR" in line or "WARNING" in line or "Limit" in line):
            self.log_time_limits.append(f"{child} | {line[:300]}")
        if WORKER_LOST.search(line):
            self.log_worker_lost.append(f"{child} | {line[:300]}")
        self._last_line[child] = line

    # ------------------------------------------------------------------ the report ----------
    def report(self, final: bool = False) -> dict:
        now = time.time()
        published = [p for p in self.ledger if p.kind != "withheld"]
        due = [p for p in self.ledger if p.usable and now - p.at > self.lost_after]
        lost = [p for p in due if p.id not in self.rows]
        pending = [p for p in self.ledger if p.usable and p.id not in self.rows and p not in due]
        with_row = [p for p in self.ledger if p.id in self.rows]
        terminal = [p for p in with_row if self.rows[p.id]["state"] in TERMINAL]
        states: dict[str, int] = {}
        for p in with_row:
            states[self.rows[p.id]["state"]] = states.get(self.rows[p.id]["state"], 0) + 1
        unusable = [p for p in self.ledger if not p.usable]
        over = {rid: w for rid, w in self.longest_wait.items() if w > self.recovery_bound}
        longest = max(self.longest_wait.items(), key=lambda kv: kv[1], default=(None, 0.0))
        limited_rows = [
            {"post": rid, "state": r["state"], "attempts": r["attempts"], "reason": r["reason"]}
            for rid, r in self.rows.items()
            if r["reason"] and TIME_LIMIT.search(r["reason"])
        ]
        swallowed_tb, chaos_tb, seen_tb = self._classify_tracebacks()
        no_outcome = self._kills_without_outcome()
        silent = self._silent_tags(now)
        special = {p.kind: self._special(p) for p in self.ledger if p.kind in ("hang", "big_png")}
        rss = self._rss_growth(now)
        data = {
            "final": final,
            "minutes": round((now - self.started) / 60, 1),
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "published": {
                "listed": len(published),
                "usable": sum(p.usable for p in published),
                "unusable": len(unusable),
                "withheld": len(self.ledger) - len(published),
            },
            "rows": {"of_published": len(with_row), "terminal": len(terminal), "by_state": states},
            "unusable_entries": [
                {
                    "post": p.id,
                    "row": self.rows.get(p.id, {}).get("state"),
                    "reason": self.rows.get(p.id, {}).get("reason"),
                }
                for p in unusable
            ],
            "lost": [{"post": p.id, "tag": p.tag, "kind": p.kind, "age_s": round(now - p.at)} for p in lost],
            "not_yet_due": len(pending),
            "cursors": [{k: str(v) if v is not None else None for k, v in c.items()} for c in self.cursors],
            "recovery_bound_s": self.recovery_bound,
            "longest_wait": {
                "post": longest[0],
                "seconds": round(longest[1]),
                "state": self.rows.get(longest[0], {}).get("state"),
            },
            "rows_past_bound": [
                {
                    "post": rid,
                    "waited_s": round(w),
                    "state": self.rows.get(rid, {}).get("state"),
                    "reason": self.rows.get(rid, {}).get("reason"),
                }
                for rid, w in sorted(over.items())
            ],
            "time_limits": {
                "rows": limited_rows,
                "log_lines": self.log_time_limits[-20:],
                "log_count": len(self.log_time_limits),
            },
            "hook_hangs_started": self._hangs_started(),
            "special_posts": special,
            "worker_lost_log_lines": len(self.log_worker_lost),
            "claimed_at_kill_without_outcome": no_outcome,
            "silent_tags": silent,
            "tracebacks": {
                "total": len(self.tracebacks),
                "attributed_to_a_row": len(seen_tb),
                "in_chaos_windows": len(chaos_tb),
                "unattributed": [_tb_dict(t, self.started) for t in swallowed_tb[:30]],
                "unattributed_count": len(swallowed_tb),
                "exceptions": _count(t.exception.split(":")[0] for t in self.tracebacks),
            },
            "chaos": self.chaos,
            "rss": rss,
            "sample_errors": self.sample_errors[-10:],
        }
        data["verdict"] = self._verdict(data, lost, over, swallowed_tb, no_outcome + silent, special, rss)
        return data

    def _hangs_started(self) -> int:
        try:
            return len(self.hang_log.read_text().splitlines()) if self.hang_log else 0
        except OSError:
            return 0

    def _special(self, p: Published) -> dict:
        row = self.rows.get(p.id)
        if row is None:
            return {"post": p.id, "row": None}
        return {
            "post": p.id,
            "state": row["state"],
            "attempts": row["attempts"],
            "reason": row["reason"],
            "longest_wait_s": round(self.longest_wait.get(p.id, 0)),
        }

    def _classify_tracebacks(self) -> tuple[list[Traceback], list[Traceback], list[Traceback]]:
        """(unattributed, in a chaos window, attributed). A lost worker's traceback is attributed: its row is
        judged by `claimed_at_kill_without_outcome`."""
        swallowed, chaos, seen = [], [], []
        restarts = [c["at"] for c in self.chaos if c["name"] != "sigkill"]
        for tb in self.tracebacks:
            row = self.rows_by_db_id.get(tb.post) if tb.post is not None else None
            lost_worker = WORKER_LOST.search(tb.exception) or "ExceptionWithTraceback" in tb.exception
            on_a_row = row is not None and (row["reason"] or row["state"] == "failed")
            if lost_worker or on_a_row:
                seen.append(tb)
            elif any(0 <= tb.at - at <= CHAOS_WINDOW for at in restarts):
                chaos.append(tb)
            else:
                swallowed.append(tb)
        return swallowed, chaos, seen

    def _kills_without_outcome(self) -> list[dict]:
        out = []
        for db_id, (state, updated) in self.claimed_at_kill.items():
            row = self.rows_by_db_id.get(db_id)
            if row is None or (row["state"] == state and row["updated_at"] == updated):
                out.append({"db_id": db_id, "remote_id": row and row["remote_id"], "state": state})
        return out

    def _silent_tags(self, now: float) -> list[dict]:
        """Tags whose polling stopped with no `last_error` (a swallowed exception in a tag poll, issue 17)."""
        out = []
        for c in self.cursors:
            polled = _utc(c.get("last_poll_at"))
            if polled and not c.get("last_error") and now - polled.timestamp() > self.stuck_tag_after:
                out.append({"tag": c["tag"], "not_polled_s": round(now - polled.timestamp())})
        return out

    def _rss_growth(self, now: float) -> dict:
        span = now - self.started
        window = min(600.0, span / 3)
        first_end, last_start = self.started + window, now - window
        judged, short = [], 0
        for (pid, role), samples in sorted(self.rss.items(), key=lambda kv: kv[0][1]):
            born = samples[0][0]
            # its first minute is imports and pools starting, not growth
            first = [k for t, k in samples if born + WARM_UP <= t <= first_end + WARM_UP]
            last = [k for t, k in samples if t >= last_start]
            if len(first) < 2 or len(last) < 2 or samples[0][0] > self.started + 60:
                short += 1
                continue
            a, b = statistics.mean(first), statistics.mean(last)
            judged.append(
                {
                    "role": role,
                    "pid": pid,
                    "first_mib": round(a / 1024, 1),
                    "last_mib": round(b / 1024, 1),
                    "growth_pct": round((b / a - 1) * 100, 1),
                }
            )
        return {"window_s": round(window), "warm_up_s": WARM_UP, "processes": judged, "not_long_lived": short}

    def _verdict(self, data, lost, over, swallowed_tb, no_outcome, special, rss) -> list[str]:
        def line(ok: bool, text_: str) -> str:
            return f"{'PASS' if ok else 'FAIL'}: {text_}"

        hang = special.get("hang")
        hang_ok = bool(
            hang and hang.get("state") in TERMINAL and hang.get("reason") and TIME_LIMIT.search(hang["reason"])
        )
        growth = [p for p in rss["processes"] if p["growth_pct"] >= RSS_GROWTH_LIMIT]
        restarts = sum(c["name"] == "service exited" for c in self.chaos)
        unjudged = f" (the service restarted {restarts} times: a process must live through both windows)"
        swallowed = len(swallowed_tb) + len(no_outcome)
        out = [
            line(not lost, f"{len(lost)} posts lost"),
            line(
                not over,
                f"{len(over)} rows waited past the recovery bound of {self.recovery_bound:.0f} s "
                f"(longest {data['longest_wait']['seconds']} s)",
            ),
            line(
                not swallowed,
                f"{swallowed} errors swallowed ({len(swallowed_tb)} unattributed tracebacks, "
                f"{len(no_outcome)} rows claimed at a SIGKILL with no outcome since or tags silently not polled)",
            ),
            line(hang_ok, f"hang cut and recorded: {hang if hang else 'no hang picture fed yet'}"),
            line(
                not growth and bool(rss["processes"]),
                f"RSS growth < {RSS_GROWTH_LIMIT:.0f}% in {len(rss['processes'])} long-lived processes"
                + (
                    f"; over: {', '.join(p['role'] + ' ' + str(p['growth_pct']) + '%' for p in growth)}"
                    if growth
                    else ""
                )
                + (unjudged if restarts else ""),
            ),
        ]
        if "big_png" in special:
            big = special["big_png"]
            out.append(
                line(
                    big.get("state") in TERMINAL and bool(big.get("reason")) or big.get("state") == "done",
                    f"16-bit PNG near the pixel cap ended: {big}",
                )
            )
        return out


def render_markdown(data: dict) -> str:
    lines = [
        f"# Soak report ({'final' if data['final'] else 'in progress'}), {data['minutes']} min, "
        f"written {data['written_at']}",
        "",
    ]
    lines += ["## Verdict", *[f"- {v}" for v in data["verdict"]], ""]
    p, r = data["published"], data["rows"]
    lines += [
        "## Posts",
        f"- published {p['listed']} (usable {p['usable']}, unusable entries {p['unusable']}), withheld {p['withheld']}",
        f"- rows {r['of_published']}, terminal {r['terminal']}, by state {r['by_state']}",
        f"- lost {len(data['lost'])}: {data['lost'][:20]}",
        f"- no row yet but not due: {data['not_yet_due']}",
        f"- unusable entries: {data['unusable_entries']}",
        f"- longest wait {data['longest_wait']} vs bound {data['recovery_bound_s']:.0f} s; past it: "
        f"{data['rows_past_bound'][:20]}",
        "",
        "## Time limits and hangs",
        f"- rows whose reason names a time limit: {data['time_limits']['rows'][:20]}",
        f"- log lines naming a time limit: {data['time_limits']['log_count']}",
        f"- soak hook hangs started: {data['hook_hangs_started']}; special posts: {data['special_posts']}",
        "",
        "## Errors",
        f"- worker-lost log lines: {data['worker_lost_log_lines']}; rows claimed at a SIGKILL with no outcome since: "
        f"{data['claimed_at_kill_without_outcome']}; tags not polled with no error: {data['silent_tags']}",
        f"- tracebacks {data['tracebacks']['total']}: attributed {data['tracebacks']['attributed_to_a_row']}, "
        f"in chaos windows {data['tracebacks']['in_chaos_windows']}, unattributed "
        f"{data['tracebacks']['unattributed_count']}; by exception {data['tracebacks']['exceptions']}",
        *[f"  - {t}" for t in data["tracebacks"]["unattributed"][:15]],
        f"- cursors: {data['cursors']}",
        f"- sampling errors: {data['sample_errors']}",
        "",
        f"## RSS (first vs last {data['rss']['window_s']} s; {data['rss']['not_long_lived']} short-lived not judged)",
        *[
            f"- {x['role']} pid {x['pid']}: {x['first_mib']} -> {x['last_mib']} MiB ({x['growth_pct']:+}%)"
            for x in data["rss"]["processes"]
        ],
        "",
        "## Chaos",
        *[f"- min {c['minute']}: {c['name']} {c['detail']}" for c in data["chaos"]],
    ]
    return "\n".join(lines) + "\n"


def _tb_dict(tb: Traceback, started: float) -> dict:
    return {
        "minute": round((tb.at - started) / 60, 1),
        "child": tb.child,
        "exception": tb.exception,
        "after": tb.context,
    }


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _post_ref(line: str) -> int | None:
    match = POST_REF.search(line)
    return int(match.group(1)) if match else None


def _utc(value) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _connect_args(url: str) -> dict:
    return {"timeout": 5} if url.startswith("sqlite") else {"connect_timeout": 5}
