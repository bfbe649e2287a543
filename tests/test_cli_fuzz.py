"""Property-based fuzz of the command line (issue 21): every WAIFU_* setting (every field of Settings) and every
argument and option of every command, enumerated from the code, given random and hostile values. A bad
setting gets one line naming it, a bad argument a usage error naming it; never a traceback.

Most examples run in this process (typer's CliRunner: a subprocess per example would take minutes); a
sample runs the real `waifu` as a subprocess. Commands that never return or replace the process (run,
worker, beat, web, scrape) and the heavy ones (detect, predict, report) have their arguments parsed
only; the others run for real against a migrated SQLite database and the test Redis.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import typer.main
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer._click.exceptions import ClickException
from typer.testing import CliRunner

from core.settings import Settings, reset_settings_cache, settings_problem
from tests.support.env import PROJECT_ROOT, TEST_REDIS_URL
from tests.support.summary import show_summary
from waifu.cli import app

EXAMPLES = int(os.environ.get("WAIFU_FUZZ_EXAMPLES", "30"))
CLI_EXAMPLES = int(os.environ.get("WAIFU_FUZZ_CLI_EXAMPLES", "12"))  # per command: each runs it in-process
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\w+(Error|Exception): ", re.M)
PARSE_ONLY = {"run", "worker", "beat", "web", "scrape", "detect", "predict", "report"}

text_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")  # no NUL in env/argv
hostile = st.one_of(
    st.text(text_chars, max_size=30),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "-1", "0", "1e309", "nan", "²", "①", "true", "false", "yes", "2", "1,2,x"]),
    st.sampled_from(["{", "[]", '{"x": 1}', '{"gelbooru": {"url": 5}}', '{"nosuch": {}}', "null", '"s"']),
    st.sampled_from(["redis://", "http://x", "postgresql://", "sqlite://", "://", "unix://", "%", "a" * 5000]),
)


def settings_fields() -> list[str]:
    return sorted(Settings.model_fields)


def relative(value: str) -> str:
    """Path settings stay inside the test's directory: a fuzzed absolute path could be anywhere."""
    return "fuzz/" + value.lstrip("/")


# ------------------------------------------------------------------------------- settings ----
@given(field=st.sampled_from(settings_fields()), value=hostile)
@settings(max_examples=EXAMPLES * 4, deadline=None, database=None)
@example(field="log_level", value="loud")  # accepted, then logging refused it with a traceback
@example(field="database_url", value="garbage:pw@host")  # SQLAlchemy quoted the whole value back
@example(field="broker_url", value="http://x")
@example(field="sites", value="{")
@example(field="detector_angles", value="a,b")  # float('a') escaped the validator as a ValueError
@example(field="extra_hosts", value="1,2,x")
def test_every_setting_is_accepted_or_refused_in_one_line_naming_it(field: str, value: str) -> None:
    name = f"WAIFU_{field.upper()}"
    if field in ("data_dir", "lbpcascade_path"):
        value = relative(value)
    try:
        _from_env(name, value)
    except Exception as exc:  # what the CLI's callback turns into its one line
        line = settings_problem(exc)
        assert name in line, (name, value, line)
        assert "\n" not in line, (name, value, line)  # one bad setting, one line
        assert "Traceback" not in line


def _from_env(name: str, value: str) -> Settings:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        return Settings(_env_file=None)
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


@sqlite_only
def test_bad_settings_through_the_real_cli(service_env, tmp_path: Path) -> None:
    """A sample as a person meets it: the real `waifu`, one line on stderr naming the setting, exit 2."""
    cases = {
        "WAIFU_PAGE_SIZE": "abc",
        "WAIFU_SITES": "{bad json",
        "WAIFU_LOG_LEVEL": "loud",
        "WAIFU_DATABASE_URL": "no-scheme-at-all",
        "WAIFU_BROKER_URL": "http://127.0.0.1:1/0",
        "WAIFU_DETECTOR_ANGLES": "left,right",
        "WAIFU_HTTP_TIMEOUT_S": "-3",
        "WAIFU_WEB_PORT": "99999",
    }
    for name, value in cases.items():
        env = {**os.environ, **service_env, name: value}
        done = subprocess.run(
            [sys.executable, "-m", "waifu.cli", "status"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (name, value, done.stdout[-500:], done.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith(f"bad setting {name}"), (name, done.stderr[-2000:])
        assert not TRACEBACK.search(done.stdout + done.stderr)


# ------------------------------------------------------------------------------ arguments ----
def commands() -> list[tuple[list[str], object]]:
    """(path, command) for every command of `waifu`, enumerated from the typer app."""
    found = []

    def walk(command, path):
        subs = getattr(command, "commands", None)
        if subs:
            for name, sub in sorted(subs.items()):
                walk(sub, [*path, name])
        else:
            found.append((path, command))

    walk(typer.main.get_command(app), [])
    return found


@st.composite
def argv(draw, path: list[str], command) -> list[str]:
    args = list(path)
    for param in command.params:
        if not draw(st.booleans()):
            continue
        value = draw(hostile)
        if param.param_type_name == "argument":
            count = 1 if param.nargs == 1 else draw(st.integers(1, 3))
            args += [value] + [draw(hostile) for _ in range(count - 1)]
        elif getattr(param, "is_flag", False):
            args.append(param.opts[0])
        else:
            args += [param.opts[0], value]
    if draw(st.integers(0, 9)) == 0:
        args.append(draw(st.sampled_from(["--no-such-option", "-x", "--", "extra"])))
    return args


# found by this fuzz, fixed, tried first on every run (Hypothesis @example)
FOUND_ARGS = [
    ["healthcheck", "--http", "::"],  # httpx.InvalidURL escaped as a traceback
    ["reconcile", "--older-than", "63931898074.0"],  # OverflowError: a date before year 1
    ["reconcile", "--older-than", "nan"],  # ValueError from timedelta(nan)
    ["faces", "reject", "9223372036854775808"],  # OverflowError in the SQLite driver
    ["faces", "label", "9223372036854775808", "x"],
    ["faces", "undo", "-5"],
]


def bind(attempt, path, command):
    def one(args: list[str]) -> None:
        attempt(path, command, args)

    return one


@sqlite_only
def test_every_argument_gets_an_answer_never_a_traceback(service_env, tmp_path, monkeypatch, request) -> None:
    monkeypatch.chdir(tmp_path)  # anything a fuzzed value names lands here
    reset_settings_cache()
    runner = CliRunner()
    tried: Counter[str] = Counter()
    codes: dict[str, Counter[int]] = {}

    def attempt(path: list[str], command, args: list[str]) -> None:
        label = " ".join(path)
        tried[label] += 1
        if path[0] in PARSE_ONLY or "--wait" in args:  # never returns, replaces the process, or is heavy
            try:
                command.make_context(label, args[len(path) :])
            except ClickException as exc:
                message = exc.format_message()
                assert message.strip(), (args, message)
                codes.setdefault(label, Counter())[exc.exit_code] += 1
            return
        reset_settings_cache()
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
        output = result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            args,
            repr(result.exception),
            output[-2000:],
        )
        assert result.exit_code in (0, 1, 2, 3), (args, result.exit_code, output[-2000:])
        assert not TRACEBACK.search(output), (args, output[-2000:])
        codes.setdefault(label, Counter())[result.exit_code] += 1

    for path, command in commands():
        run = settings(
            max_examples=CLI_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        test = given(argv(path, command))(bind(attempt, path, command))
        for case in FOUND_ARGS:
            if case[: len(path)] == path:
                test = example(case)(test)
        run(test)()
    lines = [
        f"  waifu {label:20} {n:3} tried, exit codes {dict(sorted(codes.get(label, {}).items()))}"
        for label, n in sorted(tried.items())
    ]
    show_summary(request, f"cli fuzz: {sum(tried.values())} command lines", lines)


@sqlite_only
def test_bad_arguments_through_the_real_cli(service_env, tmp_path: Path) -> None:
    cases = [
        ["reconcile", "--older-than", "soon"],
        ["reconcile", "--older-than", "1e12"],
        ["--log-level", "loud", "status"],
        ["web", "--port", "99999"],
        ["faces", "label", "²", "x"],
        ["worker", "--concurrency", "many"],
        ["healthcheck", "--http", "::"],
        ["db", "upgrade", "no-such-revision"],
        ["characters", "add", "rating:safe"],
    ]
    for args in cases:
        done = subprocess.run(
            [sys.executable, "-m", "waifu.cli", *args],
            env={**os.environ, **service_env, "WAIFU_BROKER_URL": TEST_REDIS_URL, "COLUMNS": "200"},
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = done.stdout + done.stderr
        assert done.returncode in (1, 2), (args, done.returncode, output[-2000:])
        assert not TRACEBACK.search(output), (args, output[-2000:])
        assert output.strip(), args
