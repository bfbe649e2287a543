#!/usr/bin/env bash
# What the test suite needs beside .venv, made ready where it can be (used by `make test`, `make test-fast`
# and .ci/run, so there is one copy of this):
# - Redis and PostgreSQL (WAIFU_TEST_REDIS_URL / WAIFU_TEST_POSTGRES_URL, default 127.0.0.1:6379 and
#   127.0.0.1:5432): started when they are local and down. Without them the suite cannot run: exit 1.
# - tmux, docker-compose, chromium and chromium-driver (Debian packages): as root, installed with apt-get
#   non-interactively; otherwise (or with WAIFU_TEST_NO_INSTALL=1) it says which tests fail without them.
# It never stops anything it did not start, and starts nothing that already answers.
set -euo pipefail

REDIS_URL="${WAIFU_TEST_REDIS_URL:-redis://127.0.0.1:6379/13}"
POSTGRES_URL="${WAIFU_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/test}"

# host and port of scheme://[user[:password]@]host[:port][/path]
url_host() { local rest="${1#*://}"; rest="${rest%%/*}"; rest="${rest##*@}"; echo "${rest%%:*}"; }
url_port() {
  local rest="${1#*://}"; rest="${rest%%/*}"; rest="${rest##*@}"
  if [[ "$rest" == *:* ]]; then echo "${rest##*:}"; else echo "$2"; fi
}
REDIS_HOST="$(url_host "$REDIS_URL")"; REDIS_PORT="$(url_port "$REDIS_URL" 6379)"
PG_HOST="$(url_host "$POSTGRES_URL")"; PG_PORT="$(url_port "$POSTGRES_URL" 5432)"

is_root() { [ "$(id -u)" = 0 ]; }
can_install() { is_root && [ -z "${WAIFU_TEST_NO_INSTALL:-}" ] && command -v apt-get >/dev/null 2>&1; }
is_local() { [ "$1" = 127.0.0.1 ] || [ "$1" = localhost ] || [ "$1" = ::1 ]; }
say() { echo "test-services: $*"; }

apt_install() {  # apt_install PACKAGE...: quiet, non-interactive; refreshes the package lists only if needed
  export DEBIAN_FRONTEND=noninteractive
  say "installing $* (apt-get)"
  apt-get install -y -q "$@" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q "$@" >/dev/null; }
}

redis_up() {
  if command -v redis-cli >/dev/null 2>&1; then
    redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping >/dev/null 2>&1
  else  # no client: a bare RESP PING over bash's /dev/tcp
    exec 3<>"/dev/tcp/$REDIS_HOST/$REDIS_PORT" 2>/dev/null || return 1
    printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG; local ok=$?
    exec 3>&-; return $ok
  fi
}
postgres_up() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -h "$PG_HOST" -p "$PG_PORT" -q
  else
    (exec 3<>"/dev/tcp/$PG_HOST/$PG_PORT") 2>/dev/null
  fi
}

failed=0

# ------------------------------------------------------------------------------------ redis ----
if ! redis_up && is_local "$REDIS_HOST"; then
  if ! command -v redis-server >/dev/null 2>&1 && can_install; then apt_install redis-server redis-tools; fi
  if command -v redis-server >/dev/null 2>&1; then
    say "starting redis-server on port $REDIS_PORT"
    dir="${TMPDIR:-/tmp}/waifu-test-redis-$(id -u)"
    mkdir -p "$dir"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
      --dir "$dir" --logfile "$dir/redis.log"
  fi
fi

# ------------------------------------------------------------------------------- postgresql ----
if ! postgres_up && is_local "$PG_HOST"; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1 && can_install; then apt_install postgresql; fi
  cluster="$(ls /etc/postgresql 2>/dev/null | head -n1 || true)"
  if [ -n "$cluster" ] && is_root && command -v pg_ctlcluster >/dev/null 2>&1; then
    say "starting postgresql $cluster"
    pg_ctlcluster --skip-systemctl-redirect "$cluster" main start || say "pg_ctlcluster $cluster main start failed"
  fi
fi

for _ in $(seq 1 30); do
  redis_up && postgres_up && break
  sleep 1
done
if ! redis_up; then
  say "Redis does not answer at $REDIS_HOST:$REDIS_PORT: nearly every test needs it (the broker, databases 13 to 15)."
  say "  install it (apt-get install redis-server) and run this as root to start it, or start one yourself,"
  say "  or point WAIFU_TEST_REDIS_URL at one"
  failed=1
fi
if ! postgres_up; then
  say "PostgreSQL does not answer at $PG_HOST:$PG_PORT: every database test runs on it as well as SQLite."
  say "  install it (apt-get install postgresql) and run this as root to start it, or point"
  say "  WAIFU_TEST_POSTGRES_URL at a server where that user may create databases (trust auth)"
  failed=1
elif command -v psql >/dev/null 2>&1 && ! psql "$POSTGRES_URL" -Atqc 'select 1' >/dev/null 2>&1; then
  if is_local "$PG_HOST" && is_root && command -v runuser >/dev/null 2>&1 \
    && runuser -u postgres -- psql -p "$PG_PORT" -Atqc 'select 1' >/dev/null 2>&1; then
    db="${POSTGRES_URL##*/}"; db="${db%%\?*}"
    say "creating database $db"
    runuser -u postgres -- createdb -p "$PG_PORT" "$db" 2>/dev/null || true
  fi
  if ! psql "$POSTGRES_URL" -Atqc 'select 1' >/dev/null 2>&1; then
    say "PostgreSQL answers but $POSTGRES_URL does not let the tests in: they need that database and"
    say "  password-less (trust) access for a user that may create databases (see README, Tests)"
    failed=1
  fi
fi

# -------------------------------------------------------------------- the tools a few tests use ----
# package:command:what fails without it
tools=(
  "tmux:tmux:tests/test_run.py (waifu run's live summary watched in a real terminal)"
  "docker-compose:docker-compose:tests/test_compose.py (docker-compose.yml validated without an engine)"
  "chromium:chromium:tests/test_web_browser.py and test_web_who.py's browser test"
  "chromium-driver:chromedriver:the same browser tests (Selenium drives chromium through it)"
)
missing=()
for entry in "${tools[@]}"; do
  IFS=: read -r package command _ <<<"$entry"
  command -v "$command" >/dev/null 2>&1 || missing+=("$package")
done
# docker's own compose plugin does instead of docker-compose (tests/test_compose.py takes either)
if [[ " ${missing[*]-} " == *" docker-compose "* ]] && docker compose version >/dev/null 2>&1; then
  missing=("${missing[@]/docker-compose/}")
fi
read -r -a missing <<<"${missing[*]-}"
if [ "${#missing[@]}" -gt 0 ] && can_install; then
  apt_install "${missing[@]}" || say "apt-get could not install ${missing[*]}"
  still=()
  for entry in "${tools[@]}"; do
    IFS=: read -r package command _ <<<"$entry"
    [[ " ${missing[*]} " == *" $package "* ]] && ! command -v "$command" >/dev/null 2>&1 && still+=("$package")
  done
  missing=("${still[@]+"${still[@]}"}")
fi
if [ "${#missing[@]}" -gt 0 ]; then
  why="as root this script installs them"
  is_root && why="WAIFU_TEST_NO_INSTALL is set or apt-get failed"
  say "missing: ${missing[*]} ($why: apt-get install ${missing[*]}). Without them these tests fail:"
  for entry in "${tools[@]}"; do
    IFS=: read -r package _ what <<<"$entry"
    [[ " ${missing[*]} " == *" $package "* ]] && say "  $package: $what"
  done
  [[ " ${missing[*]} " == *" docker-compose "* ]] || say "  (make test-fast runs none of them)"
fi

exit "$failed"
