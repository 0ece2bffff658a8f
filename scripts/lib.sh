# shellcheck shell=bash
# Helpers shared by scripts/demo.sh and scripts/chaos.sh. coord and q need COORD (the
# coordinator binary) and DATABASE_URL set by the time they are called.

# Bold headings and colours on a terminal only (G and Y are used by the sourcing scripts).
# shellcheck disable=SC2034
if [ -t 1 ]; then
    B=$'\e[1m' G=$'\e[32m' R=$'\e[31m' Y=$'\e[33m' N=$'\e[0m'
else
    B='' G='' R='' Y='' N=''
fi
step() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
say() { printf '    %s\n' "$*"; }
die() {
    printf '%s%s: error: %s%s\n' "$R" "${0##*/}" "$*" "$N" >&2
    exit 1
}

# coord LIMIT_SECONDS ARGS...: a coordinator call, bounded in time.
coord() {
    local limit=$1
    shift
    timeout --kill-after=5 "$limit" "$COORD" "$@"
}

# q ARGS...: psql with a statement timeout of ${Q_TIMEOUT_S:-120} seconds; -At: bare values.
q() {
    local limit=${Q_TIMEOUT_S:-120}
    PGOPTIONS="-c statement_timeout=${limit}s -c client_min_messages=warning" \
        timeout --kill-after=5 $((limit + 30)) \
        psql -X -q -v ON_ERROR_STOP=1 -At -d "$DATABASE_URL" "$@"
}

# field NAME JSON: a field of `coordinator status --json` (pretty-printed, one field per line).
field() {
    printf '%s\n' "$2" | sed -n -E 's/^ *"'"$1"'": "?([^",]*)"?,?$/\1/p' | head -n 1
}
