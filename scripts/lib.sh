# shellcheck shell=bash
# Helpers shared by scripts/demo.sh and scripts/chaos.sh. Source it after setting COORD (the
# coordinator binary) and DATABASE_URL.

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
