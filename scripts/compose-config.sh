#!/usr/bin/env bash
# Validate deploy/docker-compose.yml (or the files given) the way `make lint` wants:
#
#   scripts/compose-config.sh [compose-file...]
#
# Runs `docker compose -f FILE config -q` when the Compose v2 plugin is there, otherwise
# Debian's `docker-compose -f FILE config -q` (1.29, which needs no Docker daemon for
# `config`). When neither exists, Debian's `docker-compose` package is installed with
# apt-get when running as root; otherwise the script prints the command to run and exits 1.
# The gpu profile is validated too (COMPOSE_PROFILES=gpu).

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
PROG="compose-config.sh"
IS_ROOT=0
[[ "$(id -u)" == 0 ]] && IS_ROOT=1

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

files=("$@")
((${#files[@]})) || files=("$ROOT/deploy/docker-compose.yml")

# Sets COMPOSE to the command that runs Compose, or returns 1.
find_compose() {
    if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
        return 0
    fi
    if command -v docker-compose >/dev/null 2>&1; then
        COMPOSE=(docker-compose)
        return 0
    fi
    return 1
}

# Install Debian's docker-compose (root) or tell the user how to (non-root).
install_compose() {
    if ((!IS_ROOT)); then
        log "neither \`docker compose\` (v2 plugin) nor \`docker-compose\` is installed"
        log "install one, e.g.:"
        echo "    sudo apt-get install -y docker-compose" >&2
        exit 1
    fi
    command -v apt-get >/dev/null 2>&1 \
        || die "no docker compose / docker-compose and apt-get is not available; install Docker Compose manually"
    local apt_opts=(-y -qq --no-install-recommends -o DPkg::Lock::Timeout=300
                    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    local need_update=0
    # (no `| grep -q`: with pipefail an early grep exit fails the pipeline)
    if [[ "$(apt-cache policy docker-compose 2>/dev/null || true)" != *"Candidate: "[0-9]* ]]; then need_update=1; fi
    if ((need_update)); then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >&2 || die "apt-get update failed"
    fi
    log "installing Debian package: docker-compose"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" docker-compose </dev/null >&2; then
        if ((!need_update)); then
            log "install failed; retrying after apt-get update"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >&2 || die "apt-get update failed"
            DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" docker-compose </dev/null >&2 \
                || die "apt-get install docker-compose failed"
        else
            die "apt-get install docker-compose failed"
        fi
    fi
}

COMPOSE=()
if ! find_compose; then
    install_compose
    find_compose || die "docker-compose still not found after installing it"
fi

for file in "${files[@]}"; do
    [[ -f "$file" ]] || die "no such compose file: $file"
    log "${COMPOSE[*]} -f ${file#"$ROOT"/} config -q"
    "${COMPOSE[@]}" -f "$file" config -q
    log "COMPOSE_PROFILES=gpu ${COMPOSE[*]} -f ${file#"$ROOT"/} config -q"
    COMPOSE_PROFILES=gpu "${COMPOSE[@]}" -f "$file" config -q
done
log "ok"
