#!/usr/bin/env bash
# Local Postgres + NATS JetStream for lmforge development, tests and CI.
#
#   scripts/services.sh up      ensure both run, print the two URLs
#   scripts/services.sh env     ensure both run, print only `export ...` lines
#   scripts/services.sh status  print what runs and where
#   scripts/services.sh down    stop the private instances (data is kept)
#
# If LMFORGE_DATABASE_URL / LMFORGE_NATS_URL are set and answer, they are used
# as is. Otherwise private instances are started under <repo>/.lmforge/ on
# 127.0.0.1 (Postgres prefers port 55432, NATS 54222, NATS monitoring 58222).
# Missing binaries are installed with apt-get when running as root (Debian),
# otherwise the script prints the command to run and exits 1.
#
# Everything except the requested output (URLs / export lines / status) goes
# to stderr, so `eval "$(scripts/services.sh env)"` is safe.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
STATE="$ROOT/.lmforge"
PG_STATE="$STATE/pg"
NATS_STATE="$STATE/nats"

PG_PREFERRED_PORT="${LMFORGE_PG_PORT:-55432}"
NATS_PREFERRED_PORT="${LMFORGE_NATS_PORT:-54222}"
NATS_PREFERRED_MONITOR_PORT="${LMFORGE_NATS_MONITOR_PORT:-58222}"
PG_DB=lmforge
PG_USER=postgres
NATS_START_TIMEOUT=15
PG_START_TIMEOUT=60

PROG="services.sh"
IS_ROOT=0
[[ "$(id -u)" == 0 ]] && IS_ROOT=1

log()  { printf '%s: %s\n' "$PROG" "$*" >&2; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die()  { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

tail_file() { # file [lines]
    if [[ -r "$1" ]]; then
        printf -- '----- last lines of %s -----\n' "$1" >&2
        tail -n "${2:-30}" "$1" >&2 || true
        printf -- '-----\n' >&2
    fi
}

# ---------------------------------------------------------------- locking ---
# Serialise concurrent invocations (e.g. parallel make targets). Children that
# outlive us (postgres, nats-server) must not inherit fd 9, or the lock would
# stay held forever: every long-lived child is started with `9>&-`.
take_lock() {
    mkdir -p "$STATE"
    if command -v flock >/dev/null 2>&1; then
        exec 9>>"$STATE/lock"
        if ! flock -w 180 9; then
            die "timed out waiting for $STATE/lock (another services.sh still running?)"
        fi
    fi
}

# ------------------------------------------------------------- networking ---
# True when something accepts TCP connections on host:port.
tcp_answers() { # host port [timeout_s]
    local host="$1" port="$2" t="${3:-2}"
    timeout "$t" bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$port" 2>/dev/null
}

# True when the port cannot be used for a new 127.0.0.1 listener.
port_busy() { # port
    local p="$1"
    tcp_answers 127.0.0.1 "$p" 1 && return 0
    if command -v python3 >/dev/null 2>&1; then
        local rc=0
        python3 - "$p" <<'PY' >/dev/null 2>&1 || rc=$?
import errno, socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as e:
    sys.exit(1 if e.errno == errno.EADDRINUSE else 2)
sys.exit(0)
PY
        [[ $rc == 1 ]] && return 0
    fi
    return 1
}

# Print a free port: the preferred one, the next few, or any free one.
pick_port() { # preferred [excluded...]
    local pref="$1"; shift
    local p ex skip
    for ((p = pref; p < pref + 50; p++)); do
        skip=0
        for ex in "$@"; do [[ "$p" == "$ex" ]] && skip=1; done
        ((skip)) && continue
        if ! port_busy "$p"; then echo "$p"; return 0; fi
    done
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 30000))
        skip=0
        for ex in "$@"; do [[ "$p" == "$ex" ]] && skip=1; done
        ((skip)) && continue
        if ! port_busy "$p"; then echo "$p"; return 0; fi
    done
    die "could not find a free TCP port on 127.0.0.1"
}

# Read the first line a NATS server sends (INFO {...}).
nats_info() { # host port
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        IFS= read -r -t 2 line <&3 || exit 1
        printf "%s\n" "$line"' "$1" "$2" 2>/dev/null
}

# Minimal HTTP GET without curl (Debian minimal images lack it).
http_get() { # host port path
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n" "$2" "$0" >&3
        cat <&3' "$1" "$2" "$3" 2>/dev/null | tr -d '\r' | sed '1,/^$/d'
}

# Parse host and port out of a URL such as nats://user:pw@host:4222,nats://...
url_host_port() { # url default_port  -> "host port"
    local u="${1%%,*}" def="$2" hp host port
    u="${u#*://}"
    u="${u##*@}"
    hp="${u%%/*}"
    hp="${hp%%\?*}"
    if [[ "$hp" == \[*\]* ]]; then            # [ipv6]:port
        host="${hp%%]*}"; host="${host#[}"
        port="${hp##*]}"; port="${port#:}"
    elif [[ "$hp" == *:* ]]; then
        host="${hp%%:*}"; port="${hp##*:}"
    else
        host="$hp"; port=""
    fi
    [[ -n "$host" ]] || host=127.0.0.1
    [[ -n "$port" ]] || port="$def"
    echo "$host $port"
}

pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

pid_is() { # pid name-substring
    local cmd=""
    if [[ -r "/proc/$1/cmdline" ]]; then
        cmd="$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true)"
    elif command -v ps >/dev/null 2>&1; then
        cmd="$(ps -o args= -p "$1" 2>/dev/null || true)"
    else
        return 0
    fi
    [[ "$cmd" == *"$2"* ]]
}

read_file() { [[ -r "$1" ]] && head -n1 "$1" | tr -d '[:space:]' || true; }

# --------------------------------------------------------------- packages ---
PG_CTL="" INITDB="" POSTGRES="" PSQL="" PG_ISREADY="" NATS_BIN=""

find_pg_bins() {
    local dir="" v
    # An existing cluster must be run by the major version that created it.
    local datadir; datadir="$(pg_data_dir 2>/dev/null || true)"
    if [[ -n "$datadir" && -r "$datadir/PG_VERSION" ]]; then
        v="$(read_file "$datadir/PG_VERSION")"
        [[ -x "/usr/lib/postgresql/$v/bin/pg_ctl" ]] && dir="/usr/lib/postgresql/$v/bin"
    fi
    if [[ -z "$dir" ]] && command -v pg_ctl >/dev/null 2>&1 \
        && command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1; then
        PG_CTL="$(command -v pg_ctl)"
        INITDB="$(command -v initdb)"
        POSTGRES="$(command -v postgres)"
        dir="$(dirname "$(readlink -f "$PG_CTL")")"
    fi
    if [[ -z "$dir" ]]; then
        dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | while read -r d; do
                   [[ -x "$d/pg_ctl" && -x "$d/initdb" && -x "$d/postgres" ]] && echo "$d"
               done | tail -n1 || true)"
    fi
    [[ -n "$dir" ]] || return 1
    [[ -x "$dir/pg_ctl" ]]   && PG_CTL="$dir/pg_ctl"
    [[ -x "$dir/initdb" ]]   && INITDB="$dir/initdb"
    [[ -x "$dir/postgres" ]] && POSTGRES="$dir/postgres"
    [[ -n "$PG_CTL" && -n "$INITDB" && -n "$POSTGRES" ]] || return 1
    if [[ -x "$dir/psql" ]]; then PSQL="$dir/psql"; else PSQL="$(command -v psql || true)"; fi
    if [[ -x "$dir/pg_isready" ]]; then PG_ISREADY="$dir/pg_isready"; else PG_ISREADY="$(command -v pg_isready || true)"; fi
    [[ -n "$PSQL" ]] || return 1
    return 0
}

find_nats_bin() {
    NATS_BIN="$(command -v nats-server 2>/dev/null || true)"
    [[ -z "$NATS_BIN" && -x /usr/sbin/nats-server ]] && NATS_BIN=/usr/sbin/nats-server
    [[ -n "$NATS_BIN" ]]
}

# Install the given Debian packages (root) or tell the user how to (non-root).
ensure_packages() { # pkg...
    (($#)) || return 0
    if ((!IS_ROOT)); then
        log "missing: $* (need Postgres binaries initdb/pg_ctl/postgres and nats-server)"
        log "install them with:"
        echo "    sudo apt-get install -y postgresql nats-server" >&2
        exit 1
    fi
    command -v apt-get >/dev/null 2>&1 \
        || die "missing $* and apt-get is not available; install Postgres and nats-server manually"
    local need_update=0 p
    for p in "$@"; do
        # (no `| grep -q`: with pipefail an early grep exit fails the pipeline)
        if [[ "$(apt-cache policy "$p" 2>/dev/null || true)" != *"Candidate: "[0-9]* ]]; then need_update=1; fi
    done
    local apt_opts=(-y -qq -o DPkg::Lock::Timeout=300
                    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if ((need_update)); then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >&2 9>&- \
            || die "apt-get update failed"
    fi
    log "installing Debian packages: $*"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" "$@" </dev/null >&2 9>&-; then
        if ((!need_update)); then
            log "install failed; retrying after apt-get update"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >&2 9>&- || die "apt-get update failed"
            DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" "$@" </dev/null >&2 9>&- \
                || die "apt-get install $* failed"
        else
            die "apt-get install $* failed"
        fi
    fi
}

ensure_binaries() { # need_pg need_nats
    local pkgs=()
    if (($1)) && ! find_pg_bins; then pkgs+=(postgresql); fi
    if (($2)) && ! find_nats_bin; then pkgs+=(nats-server); fi
    ((${#pkgs[@]})) || return 0
    ensure_packages "${pkgs[@]}"
    if (($1)); then find_pg_bins || die "Postgres binaries (initdb, pg_ctl, postgres, psql) still not found after installing postgresql"; fi
    if (($2)); then find_nats_bin || die "nats-server still not found after installing nats-server"; fi
}

# --------------------------------------------------------------- postgres ---
# Run a Postgres server binary as the postgres user when we are root.
run_pg() {
    if ((IS_ROOT)); then
        (cd / && exec runuser -u "$PG_USER" -- "$@") 9>&-
    else
        "$@" 9>&-
    fi
}

ensure_pg_user() {
    ((IS_ROOT)) || return 0
    getent passwd "$PG_USER" >/dev/null 2>&1 && return 0
    log "creating system user $PG_USER"
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash "$PG_USER" \
        || die "could not create system user $PG_USER"
}

# Directory holding data/, log and the unix socket.
pg_base_dir() {
    local rec; rec="$(cat "$PG_STATE/datadir" 2>/dev/null || true)"
    if [[ -n "$rec" ]]; then echo "$rec"; else echo "$PG_STATE"; fi
}
pg_data_dir() { echo "$(pg_base_dir)/data"; }

# Decide (once) where the cluster lives and make it owned by the right user.
prepare_pg_dirs() {
    mkdir -p "$PG_STATE"
    [[ -s "$PG_STATE/datadir" ]] && { prepare_fallback_dir "$(pg_base_dir)"; return 0; }
    ((IS_ROOT)) || return 0
    chown "$PG_USER:" "$PG_STATE" 2>/dev/null || true
    chmod 0700 "$PG_STATE" 2>/dev/null || true
    if runuser -u "$PG_USER" -- test -x "$PG_STATE" -a -w "$PG_STATE" 2>/dev/null; then
        return 0
    fi
    # Repo path not traversable by postgres (e.g. under a 0700 /root).
    local hash base
    hash="$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)"
    base="/var/tmp/lmforge-pg-$hash"
    log "$ROOT is not accessible to user $PG_USER; keeping Postgres data in $base"
    chown root: "$PG_STATE"; chmod 0755 "$PG_STATE"
    prepare_fallback_dir "$base"
    printf '%s\n' "$base" >"$PG_STATE/datadir"
}

prepare_fallback_dir() {
    mkdir -p "$1"
    if ((IS_ROOT)); then
        chown "$PG_USER:" "$1"
        chmod 0700 "$1"
        runuser -u "$PG_USER" -- test -x "$1" -a -w "$1" 2>/dev/null \
            || die "Postgres directory $1 is not usable by user $PG_USER"
    fi
}

pg_socket_dir() {
    local base; base="$(pg_base_dir)"
    # unix socket paths are limited to ~107 bytes
    if ((${#base} > 80)); then echo /tmp; else echo "$base"; fi
}

pg_url() { echo "postgres://$PG_USER@127.0.0.1:$1/$PG_DB"; }

pg_running() { # -> 0 if our cluster is running
    local data; data="$(pg_data_dir)"
    [[ -f "$data/postmaster.pid" ]] || return 1
    local pid; pid="$(head -n1 "$data/postmaster.pid" 2>/dev/null || true)"
    pid_alive "$pid" || return 1
    run_pg "$PG_CTL" status -D "$data" >/dev/null 2>&1
}

# Port the running cluster listens on (from postmaster.pid, line 4).
pg_running_port() { sed -n 4p "$(pg_data_dir)/postmaster.pid" 2>/dev/null | tr -d '[:space:]'; }

pg_ready() { # port
    if [[ -n "$PG_ISREADY" ]]; then
        "$PG_ISREADY" -q -t 3 -h 127.0.0.1 -p "$1" -U "$PG_USER" -d postgres >/dev/null 2>&1
    else
        "$PSQL" -X -q -h 127.0.0.1 -p "$1" -U "$PG_USER" -d postgres -c 'select 1' >/dev/null 2>&1
    fi
}

pg_init() {
    local data; data="$(pg_data_dir)"
    if [[ -d "$data" && ! -f "$data/PG_VERSION" ]]; then
        warn "removing incomplete data directory $data"
        rm -rf -- "$data"
    fi
    [[ -f "$data/PG_VERSION" ]] && return 0
    log "initialising Postgres cluster in $data"
    local out
    if ! out="$(run_pg "$INITDB" -D "$data" --auth=trust --username="$PG_USER" \
                --encoding=UTF8 --locale=C --no-sync 2>&1 </dev/null)"; then
        printf '%s\n' "$out" >&2
        die "initdb failed for $data"
    fi
}

pg_start() {
    local data base port logf sock
    data="$(pg_data_dir)"; base="$(pg_base_dir)"; logf="$base/log"; sock="$(pg_socket_dir)"
    port="$(read_file "$PG_STATE/port")"
    if [[ -z "$port" ]] || port_busy "$port"; then
        [[ -n "$port" ]] && log "recorded Postgres port $port is busy; choosing another"
        port="$(pick_port "$PG_PREFERRED_PORT")"
    fi
    log "starting Postgres on 127.0.0.1:$port (data $data)"
    local opts="-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories='$sock'"
    opts+=" -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    if ! run_pg "$PG_CTL" -D "$data" -l "$logf" -w -t "$PG_START_TIMEOUT" -o "$opts" start \
            </dev/null >&2 2>&1; then
        tail_file "$logf"
        die "Postgres failed to start (pg_ctl start -D $data, port $port); log: $logf"
    fi
    printf '%s\n' "$port" >"$PG_STATE/port"
}

pg_ensure_db() { # port
    local exists
    exists="$("$PSQL" -X -qtA -h 127.0.0.1 -p "$1" -U "$PG_USER" -d postgres \
        -c "select 1 from pg_database where datname = '$PG_DB'" 2>&1)" \
        || die "cannot query Postgres on 127.0.0.1:$1: $exists"
    if [[ "$exists" != 1 ]]; then
        log "creating database $PG_DB"
        "$PSQL" -X -q -h 127.0.0.1 -p "$1" -U "$PG_USER" -d postgres \
            -c "create database $PG_DB owner $PG_USER" >&2 \
            || die "could not create database $PG_DB on 127.0.0.1:$1"
    fi
}

# Prints the URL of a working database.
pg_up() {
    if [[ -n "${LMFORGE_DATABASE_URL:-}" ]]; then
        if external_pg_answers "$LMFORGE_DATABASE_URL"; then
            echo "$LMFORGE_DATABASE_URL"; return 0
        fi
        warn "LMFORGE_DATABASE_URL is set but does not answer; starting a private Postgres instead"
    fi
    ensure_binaries 1 0
    ensure_pg_user
    prepare_pg_dirs
    local port
    if pg_running; then
        port="$(pg_running_port)"
        [[ -n "$port" ]] || port="$(read_file "$PG_STATE/port")"
        if ! pg_ready "$port"; then
            # Starting up or shutting down: give it a moment.
            for _ in $(seq 1 50); do pg_ready "$port" && break; sleep 0.2; done
            pg_ready "$port" || { tail_file "$(pg_base_dir)/log"; die "Postgres runs but does not answer on 127.0.0.1:$port"; }
        fi
        [[ "$(read_file "$PG_STATE/port")" == "$port" ]] || printf '%s\n' "$port" >"$PG_STATE/port"
    else
        pg_init
        pg_start
        port="$(read_file "$PG_STATE/port")"
    fi
    pg_ensure_db "$port"
    pg_url "$port"
}

external_pg_answers() { # url
    local url="$1"
    if [[ -z "$PG_ISREADY$PSQL" ]]; then find_pg_bins >/dev/null 2>&1 || true; fi
    [[ -z "$PG_ISREADY" ]] && PG_ISREADY="$(command -v pg_isready || true)"
    [[ -z "$PSQL" ]] && PSQL="$(command -v psql || true)"
    if [[ -n "$PSQL" ]]; then
        timeout 10 "$PSQL" -X -q "$url" -c 'select 1' >/dev/null 2>&1 </dev/null && return 0
        return 1
    elif [[ -n "$PG_ISREADY" ]]; then
        timeout 10 "$PG_ISREADY" -q -t 5 -d "$url" >/dev/null 2>&1
    else
        local hp; read -r -a hp <<<"$(url_host_port "$url" 5432)"
        tcp_answers "${hp[0]}" "${hp[1]}" 3
    fi
}

pg_down() {
    [[ -d "$PG_STATE" ]] || { log "Postgres: nothing to stop"; return 0; }
    find_pg_bins || { log "Postgres: binaries not found, nothing to stop"; return 0; }
    if ((IS_ROOT)) && ! getent passwd "$PG_USER" >/dev/null 2>&1; then
        log "Postgres: nothing to stop"; return 0
    fi
    local data; data="$(pg_data_dir)"
    if [[ -f "$data/PG_VERSION" ]] && pg_running; then
        log "stopping Postgres (data $data)"
        run_pg "$PG_CTL" -D "$data" -m fast -w -t 60 stop </dev/null >&2 2>&1 \
            || die "pg_ctl stop failed for $data"
    else
        log "Postgres: not running"
    fi
}

# ------------------------------------------------------------------- nats ---
nats_url() { echo "nats://127.0.0.1:$1"; }

nats_pid() {
    local pid; pid="$(read_file "$NATS_STATE/nats.pid")"
    if pid_alive "$pid" && pid_is "$pid" nats-server; then echo "$pid"; fi
}

nats_jetstream_ok() { # host port
    local info; info="$(nats_info "$1" "$2" || true)"
    [[ "$info" == INFO* && "$info" == *'"jetstream":true'* ]]
}

nats_start() {
    mkdir -p "$NATS_STATE/store"
    local port mport logf="$NATS_STATE/log" pidf="$NATS_STATE/nats.pid"
    port="$(read_file "$NATS_STATE/port")"
    if [[ -z "$port" ]] || port_busy "$port"; then port="$(pick_port "$NATS_PREFERRED_PORT")"; fi
    mport="$(read_file "$NATS_STATE/monitor_port")"
    if [[ -z "$mport" || "$mport" == "$port" ]] || port_busy "$mport"; then
        mport="$(pick_port "$NATS_PREFERRED_MONITOR_PORT" "$port")"
    fi
    rm -f "$pidf"
    log "starting nats-server (JetStream) on 127.0.0.1:$port, monitoring on 127.0.0.1:$mport"
    local launcher=()
    command -v setsid >/dev/null 2>&1 && launcher+=(setsid)
    launcher+=(nohup)
    {
        printf '\n==== %s: starting nats-server on port %s\n' "$(date -u +%FT%TZ)" "$port"
    } >>"$NATS_STATE/stdout.log"
    (cd "$NATS_STATE" && exec "${launcher[@]}" "$NATS_BIN" -js -a 127.0.0.1 -p "$port" \
        -m "$mport" -sd "$NATS_STATE/store" -P "$pidf" -l "$logf" \
        </dev/null >>"$NATS_STATE/stdout.log" 2>&1 9>&-) &
    local launched=$!
    printf '%s\n' "$port" >"$NATS_STATE/port"
    printf '%s\n' "$mport" >"$NATS_STATE/monitor_port"
    local deadline=$((SECONDS + NATS_START_TIMEOUT))
    while ((SECONDS < deadline)); do
        if nats_jetstream_ok 127.0.0.1 "$port"; then return 0; fi
        if ! pid_alive "$launched" && [[ -z "$(nats_pid)" ]]; then
            tail_file "$logf"; tail_file "$NATS_STATE/stdout.log" 10
            die "nats-server exited during startup (port $port)"
        fi
        sleep 0.1
    done
    tail_file "$logf"; tail_file "$NATS_STATE/stdout.log" 10
    die "nats-server did not answer with JetStream enabled on 127.0.0.1:$port within ${NATS_START_TIMEOUT}s"
}

# Prints the URL of a working NATS server.
nats_up() {
    if [[ -n "${LMFORGE_NATS_URL:-}" ]]; then
        local hp; read -r -a hp <<<"$(url_host_port "$LMFORGE_NATS_URL" 4222)"
        if tcp_answers "${hp[0]}" "${hp[1]}" 3; then
            nats_jetstream_ok "${hp[0]}" "${hp[1]}" \
                || warn "NATS at $LMFORGE_NATS_URL answers but does not advertise JetStream"
            echo "$LMFORGE_NATS_URL"; return 0
        fi
        warn "LMFORGE_NATS_URL is set but does not answer; starting a private nats-server instead"
    fi
    local pid port
    pid="$(nats_pid)"
    port="$(read_file "$NATS_STATE/port")"
    if [[ -n "$pid" && -n "$port" ]]; then
        local i
        for i in $(seq 1 50); do
            nats_jetstream_ok 127.0.0.1 "$port" && { nats_url "$port"; return 0; }
            pid_alive "$pid" || break
            sleep 0.2
        done
        warn "nats-server pid $pid does not answer on port $port; restarting it"
        nats_kill "$pid"
    fi
    ensure_binaries 0 1
    nats_start
    nats_url "$(read_file "$NATS_STATE/port")"
}

nats_kill() { # pid
    local pid="$1"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do pid_alive "$pid" || break; sleep 0.1; done
    if pid_alive "$pid"; then
        warn "nats-server pid $pid did not exit on SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do pid_alive "$pid" || break; sleep 0.1; done
    fi
    rm -f "$NATS_STATE/nats.pid"
}

nats_down() {
    local pid; pid="$(nats_pid)"
    if [[ -n "$pid" ]]; then
        log "stopping nats-server (pid $pid)"
        nats_kill "$pid"
    else
        rm -f "$NATS_STATE/nats.pid"
        log "nats-server: not running"
    fi
}

# --------------------------------------------------------------- commands ---
cmd_up() {
    take_lock
    local db nats
    db="$(pg_up)"
    nats="$(nats_up)"
    echo "LMFORGE_DATABASE_URL=$db"
    echo "LMFORGE_NATS_URL=$nats"
}

cmd_env() {
    take_lock
    local db nats
    db="$(pg_up)"
    nats="$(nats_up)"
    printf 'export LMFORGE_DATABASE_URL=%q\n' "$db"
    printf 'export DATABASE_URL=%q\n' "$db"
    printf 'export LMFORGE_NATS_URL=%q\n' "$nats"
}

cmd_down() {
    take_lock
    pg_down
    nats_down
}

cmd_status() {
    local port pid data mport
    if [[ -n "${LMFORGE_DATABASE_URL:-}" ]]; then
        echo "LMFORGE_DATABASE_URL is set: $LMFORGE_DATABASE_URL ($(external_pg_answers "$LMFORGE_DATABASE_URL" && echo answers || echo 'does NOT answer'))"
    fi
    if [[ -n "${LMFORGE_NATS_URL:-}" ]]; then
        local hp; read -r -a hp <<<"$(url_host_port "$LMFORGE_NATS_URL" 4222)"
        echo "LMFORGE_NATS_URL is set: $LMFORGE_NATS_URL ($(tcp_answers "${hp[0]}" "${hp[1]}" 3 && echo answers || echo 'does NOT answer'))"
    fi
    # Postgres
    if [[ -d "$PG_STATE" ]] && find_pg_bins && { ((!IS_ROOT)) || getent passwd "$PG_USER" >/dev/null 2>&1; }; then
        data="$(pg_data_dir)"
        if pg_running; then
            port="$(pg_running_port)"
            if pg_ready "$port"; then
                echo "postgres: running   url=$(pg_url "$port")  data=$data  log=$(pg_base_dir)/log  pid=$(head -n1 "$data/postmaster.pid")  bin=$(dirname "$PG_CTL")"
            else
                echo "postgres: running but not answering on 127.0.0.1:$port  data=$data"
            fi
        else
            echo "postgres: stopped   data=$data  (recorded port $(read_file "$PG_STATE/port"))"
        fi
    else
        echo "postgres: not set up (no $PG_STATE)"
    fi
    # NATS
    pid="$(nats_pid)"; port="$(read_file "$NATS_STATE/port")"; mport="$(read_file "$NATS_STATE/monitor_port")"
    if [[ -n "$pid" ]]; then
        local js="JetStream NOT enabled"
        nats_jetstream_ok 127.0.0.1 "$port" && js="JetStream enabled"
        echo "nats:     running   url=$(nats_url "$port")  monitor=http://127.0.0.1:$mport  pid=$pid  store=$NATS_STATE/store  log=$NATS_STATE/log  ($js)"
    elif [[ -d "$NATS_STATE" ]]; then
        echo "nats:     stopped   (recorded port ${port:-none})"
    else
        echo "nats:     not set up (no $NATS_STATE)"
    fi
    return 0
}

# python3 with the venv module (Debian: python3-venv), for the test drivers in Python.
cmd_python() {
    if python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then return 0; fi
    ensure_packages python3 python3-venv
}

usage() {
    cat >&2 <<EOF
usage: $0 {up|down|env|status|python}
  up      ensure Postgres and NATS JetStream run; print their URLs
  env     like up, but print only 'export ...' lines (for eval)
  status  show what runs and where
  down    stop the private instances started by this script (data is kept)
  python  make sure python3 and its venv module are installed (Debian packages)
EOF
}

main() {
    case "${1:-}" in
        up)     cmd_up ;;
        env)    cmd_env ;;
        down)   cmd_down ;;
        status) cmd_status ;;
        python) cmd_python ;;
        -h|--help|help) usage ;;
        *) usage; exit 2 ;;
    esac
}

main "$@"
