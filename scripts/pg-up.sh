#!/usr/bin/env bash
# pg-up.sh -- make sure a PostgreSQL server is reachable for Tally's tests.
#
# Usage:
#   scripts/pg-up.sh                      print ONE line on stdout: an admin database URL
#                                         (a role that can CREATE DATABASE)
#   scripts/pg-up.sh --throwaway DIR PORT create (if needed) and start a private throwaway
#                                         cluster in DIR listening on 127.0.0.1:PORT, print its URL
#   scripts/pg-up.sh --stop DIR           stop the throwaway cluster in DIR (pg_ctl -m fast stop)
#
# Everything except the URL goes to stderr.
#
# Default mode, in order:
#   a. $DATABASE_URL if set (must be reachable, otherwise exit 1)
#   b. the local server on 127.0.0.1:5432 as user postgres (trust auth)
#   c. a Debian cluster (pg_lsclusters) that is down: started with pg_ctlcluster
#   d. no PostgreSQL server binaries at all: apt-get install postgresql, retry b/c
#   e. a throwaway cluster in ${TALLY_PG_DIR:-${TMPDIR:-/tmp}/tally-pg} on port
#      ${TALLY_PG_PORT:-55432} (a higher free port is picked if 55432 is busy and
#      TALLY_PG_PORT is not set); reused if already running.
#
# Throwaway cluster layout (DIR):
#   DIR/data          the data directory (PGDATA; DIR/data/postmaster.pid has the postmaster pid)
#   DIR/postgres.log  the server log
#   DIR/.s.PGSQL.*    the unix socket (TCP 127.0.0.1:PORT is what the printed URL uses)
# When run as root, initdb/pg_ctl run as the `postgres` OS user (created if missing)
# and DIR is chowned to it.
#
# Environment: DATABASE_URL, TALLY_PG_DIR, TALLY_PG_PORT, PGCONNECT_TIMEOUT (default 5).

set -euo pipefail

PROG=pg-up.sh
SYSTEM_PORT=5432
DEFAULT_THROWAWAY_PORT=55432
READY_WAIT_SECS=30
MIN_CONNECTIONS=100

export PGCONNECT_TIMEOUT="${PGCONNECT_TIMEOUT:-5}"

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() {
    cat >&2 <<EOF
usage: $PROG                       print an admin PostgreSQL URL (starting/installing a server if needed)
       $PROG --throwaway DIR PORT  create/start a private throwaway cluster in DIR on 127.0.0.1:PORT, print its URL
       $PROG --stop DIR            stop the throwaway cluster in DIR
EOF
}

# ---------------------------------------------------------------------------
# privileges / helpers
# ---------------------------------------------------------------------------

is_root() { [ "$(id -u)" -eq 0 ]; }

have_sudo() { command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; }

can_root() { is_root || have_sudo; }

# Run a command as root: directly, or via non-interactive sudo.
# (only invoked indirectly, through run_logged)
# shellcheck disable=SC2317
as_root() {
    if is_root; then
        "$@"
    elif have_sudo; then
        sudo -n "$@"
    else
        log "error: need root for: $* (not root and no passwordless sudo)"
        return 1
    fi
}

# Run a command with stdin from /dev/null and its output collected in a temp file
# which is then copied to our stderr. This way a daemon started by the command
# can never keep our stdout/stderr pipes open (which would hang callers that
# capture our output, e.g. $(pg-up.sh) or Rust's Command::output()).
run_logged() {
    local out rc=0
    out="$(mktemp "${TMPDIR:-/tmp}/pg-up.XXXXXX")"
    "$@" </dev/null >"$out" 2>&1 || rc=$?
    if [ -s "$out" ]; then
        sed 's/^/    | /' "$out" >&2 || true
    fi
    rm -f -- "$out"
    return "$rc"
}

apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found; install $* manually (or set DATABASE_URL to a reachable server)"
    can_root ||
        die "installing $* needs root: run as root or configure passwordless sudo (or set DATABASE_URL to a reachable server)"
    log "installing $* with apt-get (this can take a minute)"
    run_logged as_root apt-get update -qq || die "apt-get update failed"
    run_logged as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" ||
        die "apt-get install $* failed"
    hash -r
}

ensure_client() {
    if command -v psql >/dev/null 2>&1 && command -v pg_isready >/dev/null 2>&1; then
        return 0
    fi
    log "psql/pg_isready not found"
    apt_install postgresql-client
    command -v psql >/dev/null 2>&1 || die "psql still not found after installing postgresql-client"
    command -v pg_isready >/dev/null 2>&1 || die "pg_isready still not found after installing postgresql-client"
}

# Hide passwords in arbitrary text (URLs with user:pass@ and key=value password=...).
redact() {
    sed -E 's#(://[^:/@?]*:)[^@/?]*@#\1***@#g; s#(password=)[^ &]*#\1***#g'
}

# Describe a libpq connection string as host:port/db, never including the password.
describe_conn() {
    local u=$1 rest authority path hostport db host port
    case $u in
    *://*)
        rest=${u#*://}
        authority=${rest%%[/?]*}
        path=${rest:${#authority}}
        hostport=${authority##*@}
        db=${path#/}
        db=${db%%\?*}
        if [ -z "$hostport" ]; then
            # host may be given as a query parameter (e.g. a unix socket dir)
            host=$(printf '%s' "$path" | sed -nE 's/.*[?&]host=([^&]*).*/\1/p')
            hostport="${host:-localhost}"
        fi
        case $hostport in
        \[*\]:* | [!\[]*:*) ;;
        *) hostport="$hostport:5432" ;;
        esac
        printf '%s/%s' "$hostport" "${db:-<default db>}"
        ;;
    *)
        host=$(printf '%s' "$u" | sed -nE 's/.*(^|[[:space:]])host=([^[:space:]]*).*/\2/p')
        port=$(printf '%s' "$u" | sed -nE 's/.*(^|[[:space:]])port=([^[:space:]]*).*/\2/p')
        db=$(printf '%s' "$u" | sed -nE 's/.*(^|[[:space:]])dbname=([^[:space:]]*).*/\2/p')
        printf '%s:%s/%s' "${host:-localhost}" "${port:-5432}" "${db:-<default db>}"
        ;;
    esac
}

# psql_try CONNINFO... : run `select 1`; on failure put the (redacted) error in PSQL_ERR.
PSQL_ERR=""
psql_try() {
    local err
    if err=$(psql -X -w -Atq "$@" -c 'select 1' 2>&1 </dev/null >/dev/null); then
        PSQL_ERR=""
        return 0
    fi
    PSQL_ERR=$(printf '%s' "$err" | redact)
    return 1
}

# Warn (stderr only) about things that would make parallel tests unhappy.
check_server() {
    local url=$1 mc priv
    if mc=$(psql -X -w -Atq -d "$url" -c 'show max_connections' 2>/dev/null </dev/null) &&
        [[ $mc =~ ^[0-9]+$ ]]; then
        if [ "$mc" -lt "$MIN_CONNECTIONS" ]; then
            log "warning: server max_connections is $mc (< $MIN_CONNECTIONS); tests running in parallel may run out of connections"
        fi
    else
        log "warning: could not read max_connections from the server"
    fi
    if priv=$(psql -X -w -Atq -d "$url" \
        -c 'select rolsuper or rolcreatedb from pg_roles where rolname = current_user' \
        2>/dev/null </dev/null); then
        if [ "$priv" != "t" ]; then
            log "warning: the role in this URL can not CREATE DATABASE; tests that create databases will fail"
        fi
    fi
}

emit() {
    local url=$1
    check_server "$url"
    printf '%s\n' "$url"
    exit 0
}

wait_ready() {
    local port=$1 i
    for ((i = 0; i < READY_WAIT_SECS; i++)); do
        if pg_isready -q -h 127.0.0.1 -p "$port" -t 1 >/dev/null 2>&1; then
            return 0
        fi
        sleep 1
    done
    return 1
}

# try_local PORT: succeeds (and sets LOCAL_URL) if 127.0.0.1:PORT accepts postgres@postgres without password.
LOCAL_URL=""
try_local() {
    local port=$1
    if ! pg_isready -q -h 127.0.0.1 -p "$port" -t 3 >/dev/null 2>&1; then
        return 1
    fi
    if psql_try -h 127.0.0.1 -p "$port" -U postgres -d postgres; then
        LOCAL_URL="postgres://postgres@127.0.0.1:$port/postgres"
        return 0
    fi
    log "server on 127.0.0.1:$port is up but user postgres cannot log in without a password:"
    printf '%s\n' "$PSQL_ERR" | sed 's/^/    | /' >&2
    return 1
}

# ---------------------------------------------------------------------------
# Debian clusters (step c)
# ---------------------------------------------------------------------------

start_debian_cluster() {
    local ver=$1 name=$2 owner=$3
    log "starting Debian cluster $ver/$name"
    if is_root || [ "$(id -un)" = "$owner" ]; then
        run_logged pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start
    elif have_sudo; then
        run_logged sudo -n pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start
    else
        log "cannot start cluster $ver/$name: not root, not its owner ($owner), no passwordless sudo"
        return 1
    fi
}

try_debian_clusters() {
    command -v pg_lsclusters >/dev/null 2>&1 || return 1
    local -a lines
    local line ver name port status owner _rest
    # port 5432 first, then the others in pg_lsclusters order
    mapfile -t lines < <(pg_lsclusters -h 2>/dev/null |
        awk -v p="$SYSTEM_PORT" '{ print ($3 == p ? 0 : 1) "\t" $0 }' | sort -s -t "$(printf '\t')" -k1,1n | cut -f2-)
    if [ "${#lines[@]}" -eq 0 ]; then
        log "pg_lsclusters: no Debian clusters"
        return 1
    fi
    for line in "${lines[@]}"; do
        read -r ver name port status owner _rest <<<"$line"
        [ -n "${port:-}" ] || continue
        case $status in
        online*)
            if [ "$port" != "$SYSTEM_PORT" ] && try_local "$port"; then
                log "using online Debian cluster $ver/$name on port $port"
                return 0
            fi
            ;;
        down*)
            log "Debian cluster $ver/$name (port $port) is down"
            if start_debian_cluster "$ver" "$name" "$owner"; then
                if wait_ready "$port"; then
                    if try_local "$port"; then
                        log "started Debian cluster $ver/$name on port $port"
                        return 0
                    fi
                else
                    log "cluster $ver/$name did not become ready within ${READY_WAIT_SECS}s"
                fi
            else
                log "failed to start cluster $ver/$name"
            fi
            ;;
        *)
            log "Debian cluster $ver/$name (port $port) has status '$status'; skipping"
            ;;
        esac
    done
    return 1
}

# ---------------------------------------------------------------------------
# throwaway clusters (step e, --throwaway, --stop)
# ---------------------------------------------------------------------------

have_server_binaries() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null 2>&1
}

# pg_bindir [MAJOR]: directory holding initdb/pg_ctl (matching MAJOR if given, else the highest).
pg_bindir() {
    local want=${1:-} d
    if [ -n "$want" ]; then
        if [ -x "/usr/lib/postgresql/$want/bin/pg_ctl" ]; then
            printf '%s\n' "/usr/lib/postgresql/$want/bin"
            return 0
        fi
        return 1
    fi
    d=$(compgen -G '/usr/lib/postgresql/*/bin/initdb' 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$d" ]; then
        dirname -- "$d"
        return 0
    fi
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname -- "$(command -v initdb)"
        return 0
    fi
    return 1
}

ensure_pg_os_user() {
    id -u postgres >/dev/null 2>&1 && return 0
    log "creating system user 'postgres'"
    if getent group postgres >/dev/null 2>&1; then
        useradd --system -g postgres --home-dir /var/lib/postgresql --no-create-home --shell /bin/bash postgres
    else
        useradd --system --user-group --home-dir /var/lib/postgresql --no-create-home --shell /bin/bash postgres
    fi || die "useradd postgres failed"
}

# Run a PostgreSQL server tool: as the postgres OS user when we are root
# (initdb/pg_ctl/postgres refuse to run as root), as ourselves otherwise.
run_as_pg() {
    if ! is_root; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && su postgres -s /bin/bash -c "$(printf '%q ' "$@")")
    fi
}

# Pid of the postmaster recorded in DATA/postmaster.pid, if any.
postmaster_pid() {
    local pid
    [ -f "$1/postmaster.pid" ] || return 1
    pid=$(head -n 1 -- "$1/postmaster.pid" 2>/dev/null | tr -d '[:space:]')
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    printf '%s\n' "$pid"
}

# Process state letter from /proc (empty if gone / not Linux).
proc_state() {
    [ -r "/proc/$1/stat" ] || return 0
    sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$1/stat" 2>/dev/null || true
}

# Is the cluster in DATA really running? pg_ctl status alone is fooled by a
# killed postmaster that is still a zombie (PID 1 in containers may reap late).
cluster_running() {
    local data=$1 bindir=$2 pid st
    [ -f "$data/PG_VERSION" ] || return 1
    run_as_pg "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1 || return 1
    if [ -d /proc/self ] && pid=$(postmaster_pid "$data"); then
        st=$(proc_state "$pid")
        case $st in "" | Z | X | x) return 1 ;; esac
    fi
    return 0
}

# After a crash (kill -9) wait, bounded, until the old postmaster is fully gone:
# postgres refuses to start while the pid in postmaster.pid still exists (even
# as a zombie).
wait_postmaster_gone() {
    local data=$1 pid i
    pid=$(postmaster_pid "$data") || return 0
    for ((i = 0; i < 40; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        case $(proc_state "$pid") in Z | X | x) ;; *) return 0 ;; esac
        sleep 0.25
    done
    return 0
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") >/dev/null 2>&1
}

valid_port() {
    [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]
}

# throwaway_up DIR PORT PORT_IS_EXPLICIT(0|1) -> prints URL, exits
throwaway_up() {
    local dir=$1 port=$2 explicit=$3 data logf bindir ver running_port sockdir p
    valid_port "$port" || die "invalid port '$port'"
    [ -n "$dir" ] || die "empty throwaway directory"
    case $dir in *"'"*) die "throwaway directory must not contain a single quote: $dir" ;; esac

    mkdir -p -- "$dir" || die "cannot create $dir"
    dir=$(cd -- "$dir" && pwd -P)
    data="$dir/data"
    logf="$dir/postgres.log"
    [ "$dir" != "/" ] || die "refusing to use / as a throwaway cluster directory"
    # Refuse to take over (chown) a non-empty directory that is not ours.
    if [ -n "$(ls -A -- "$dir")" ] && [ ! -e "$data" ] && [ ! -e "$logf" ]; then
        die "$dir is not empty and does not look like a throwaway cluster directory (no data/ or postgres.log); use an empty or new directory"
    fi
    if [ -d "$data" ] && [ -n "$(ls -A -- "$data")" ] && [ ! -f "$data/PG_VERSION" ]; then
        die "$data exists, is not empty and is not a PostgreSQL data directory"
    fi

    if [ -f "$data/PG_VERSION" ]; then
        ver=$(tr -d '[:space:]' <"$data/PG_VERSION")
        bindir=$(pg_bindir "$ver") || die "cluster in $data is PostgreSQL $ver but /usr/lib/postgresql/$ver/bin is not installed"
    else
        if ! have_server_binaries && ! command -v initdb >/dev/null 2>&1; then
            apt_install postgresql
        fi
        bindir=$(pg_bindir) || die "no PostgreSQL server binaries (initdb) found under /usr/lib/postgresql/*/bin"
    fi

    if is_root; then
        ensure_pg_os_user
        chown postgres: "$dir" || die "chown postgres $dir failed"
        if [ -e "$data" ]; then chown -R postgres: "$data" || die "chown -R postgres $data failed"; fi
        if [ -e "$logf" ]; then chown postgres: "$logf" || true; fi
        run_as_pg test -w "$dir" -a -x "$dir" ||
            die "the postgres OS user cannot write to $dir (a parent directory is probably not accessible to it); use a directory under /tmp, e.g. TALLY_PG_DIR=/tmp/tally-pg"
    fi

    if cluster_running "$data" "$bindir"; then
        running_port=$(sed -n 4p "$data/postmaster.pid" 2>/dev/null | tr -d '[:space:]')
        valid_port "${running_port:-x}" || die "cluster in $data is running but its port could not be read from postmaster.pid"
        if [ "$running_port" != "$port" ] && [ "$explicit" = 1 ]; then
            log "warning: throwaway cluster in $dir is already running on port $running_port (requested $port); using it"
        else
            log "reusing running throwaway cluster in $dir on port $running_port"
        fi
        port=$running_port
    else
        if port_in_use "$port"; then
            if [ "$explicit" = 1 ]; then
                die "port $port on 127.0.0.1 is already in use by another process"
            fi
            local found=""
            for ((p = port + 1; p <= port + 100 && p <= 65535; p++)); do
                if ! port_in_use "$p"; then
                    found=$p
                    break
                fi
            done
            [ -n "$found" ] || die "no free port found in $port..$((port + 100))"
            p=$found
            log "port $port is in use; using $p instead"
            port=$p
        fi
        if [ ! -f "$data/PG_VERSION" ]; then
            log "initdb throwaway cluster in $data ($bindir)"
            local initdb_out
            if ! initdb_out=$(run_logged run_as_pg "$bindir/initdb" -D "$data" --auth=trust -U postgres -E UTF8 --locale=C 2>&1); then
                printf '%s\n' "$initdb_out" >&2
                die "initdb failed for $data"
            fi
        fi
        # unix socket paths are limited to ~107 bytes; skip the socket if DIR is too long
        sockdir=$dir
        if [ $((${#dir} + 20)) -gt 100 ]; then
            log "warning: $dir is too long for a unix socket path; listening on TCP only"
            sockdir=""
        fi
        wait_postmaster_gone "$data"
        log "starting throwaway cluster in $dir on 127.0.0.1:$port (log: $logf)"
        # A few attempts: right after a crash the old server's children may
        # still hold its shared memory for a moment.
        local attempt started=0
        for attempt in 1 2 3 4 5; do
            if run_logged run_as_pg "$bindir/pg_ctl" -D "$data" -l "$logf" -w -t 60 \
                -o "-p $port -k '$sockdir' -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200" start; then
                started=1
                break
            fi
            cluster_running "$data" "$bindir" && {
                started=1
                break
            }
            log "pg_ctl start failed (attempt $attempt/5)"
            sleep 2
        done
        if [ "$started" != 1 ]; then
            log "could not start the throwaway cluster; last lines of $logf:"
            tail -n 20 -- "$logf" 2>/dev/null | sed 's/^/    | /' >&2 || true
            exit 1
        fi
    fi

    wait_ready "$port" || die "throwaway cluster on port $port did not become ready within ${READY_WAIT_SECS}s (see $logf)"
    if ! psql_try -h 127.0.0.1 -p "$port" -U postgres -d postgres; then
        log "cannot connect to throwaway cluster on port $port:"
        printf '%s\n' "$PSQL_ERR" | sed 's/^/    | /' >&2
        exit 1
    fi
    emit "postgres://postgres@127.0.0.1:$port/postgres"
}

throwaway_stop() {
    local dir=$1 data ver bindir
    [ -d "$dir" ] || {
        log "no directory $dir; nothing to stop"
        exit 0
    }
    dir=$(cd -- "$dir" && pwd -P)
    data="$dir/data"
    if [ ! -f "$data/PG_VERSION" ]; then
        log "no throwaway cluster in $dir; nothing to stop"
        exit 0
    fi
    ver=$(tr -d '[:space:]' <"$data/PG_VERSION")
    bindir=$(pg_bindir "$ver") || bindir=$(pg_bindir) || die "pg_ctl not found"
    if cluster_running "$data" "$bindir"; then
        log "stopping throwaway cluster in $dir"
        run_logged run_as_pg "$bindir/pg_ctl" -D "$data" -m fast -w -t 60 stop || die "pg_ctl stop failed for $data"
    else
        log "throwaway cluster in $dir is not running"
    fi
    exit 0
}

# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

main_default() {
    ensure_client

    # a. explicit DATABASE_URL
    if [ -n "${DATABASE_URL:-}" ]; then
        if psql_try -d "$DATABASE_URL"; then
            log "using DATABASE_URL ($(describe_conn "$DATABASE_URL"))"
            emit "$DATABASE_URL"
        fi
        log "error: DATABASE_URL is set but the server at $(describe_conn "$DATABASE_URL") is not reachable:"
        printf '%s\n' "$PSQL_ERR" | sed 's/^/    | /' >&2
        exit 1
    fi

    # b. local server on 127.0.0.1:5432
    if try_local "$SYSTEM_PORT"; then
        log "using local server on 127.0.0.1:$SYSTEM_PORT"
        emit "$LOCAL_URL"
    fi

    # c. a Debian cluster that is down (or online on another port)
    if try_debian_clusters; then
        emit "$LOCAL_URL"
    fi

    # d. no server binaries at all: install them and retry b/c
    if ! have_server_binaries; then
        log "no PostgreSQL server binaries found under /usr/lib/postgresql/*/bin"
        apt_install postgresql
        if try_local "$SYSTEM_PORT"; then
            log "using local server on 127.0.0.1:$SYSTEM_PORT"
            emit "$LOCAL_URL"
        fi
        if try_debian_clusters; then
            emit "$LOCAL_URL"
        fi
    fi

    # e. throwaway cluster
    local base port explicit=0
    base="${TALLY_PG_DIR:-${TMPDIR:-/tmp}/tally-pg}"
    if [ -n "${TALLY_PG_PORT:-}" ]; then
        port=$TALLY_PG_PORT
        explicit=1
    else
        port=$DEFAULT_THROWAWAY_PORT
    fi
    log "falling back to a throwaway cluster in $base"
    throwaway_up "$base" "$port" "$explicit"
}

case "${1:-}" in
"")
    main_default
    ;;
--throwaway)
    [ $# -eq 3 ] || {
        usage
        exit 2
    }
    ensure_client
    throwaway_up "$2" "$3" 1
    ;;
--stop)
    [ $# -eq 2 ] || {
        usage
        exit 2
    }
    throwaway_stop "$2"
    ;;
-h | --help)
    usage
    exit 0
    ;;
*)
    usage
    exit 2
    ;;
esac
