#!/usr/bin/env bash
# chaos.sh -- kill -9 workers in a loop against your own PostgreSQL, then prove that nothing was
# lost and nothing was done twice.
#
#   DATABASE_URL=postgres://user@host:5432/db scripts/chaos.sh \
#       [--records N=100000] [--workers W=3] [--duration 30s] [--kill-every 1s] [--lease 3s] [--keep]
#
# What it does:
#   1. builds the release binaries (unless $TALLY_BIN_DIR holds coordinator and worker),
#      runs `coordinator migrate`;
#   2. creates its own sink table tally_chaos_sink_<run id> (no unique constraint, so a second
#      effect shows up as a duplicate) and prepares the batch chaos-<run id> of N generated
#      records on the queue chaos-<run id>;
#   3. starts W workers (sql handler: one INSERT into the sink per record, slowed by
#      pg_sleep(0.002) so that kills land on open transactions and leased rows); then, for
#      --duration, kills one worker with SIGKILL every --kill-every (round robin) and starts
#      a replacement;
#   4. `coordinator wait` for the batch, stops the workers with SIGTERM;
#   5. prints records, kills, rescued, lost, duplicated and the time to recover after the last
#      kill. Exits 0 only when lost = 0 and duplicated = 0.
#   6. drops its sink table unless --keep. The batch stays in tally.batch / tally.record as a
#      record of the run. Only the workers this script started are ever signalled.
#
# Environment:
#   DATABASE_URL   (required) the database to use; the tally schema is created or upgraded
#   TALLY_BIN_DIR  use the coordinator and worker binaries in this directory, do not build
# shellcheck disable=SC2015 # `[ a ] && [ b ] || die`: die is meant to run when either test fails
set -euo pipefail

cd "$(dirname -- "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd -P)

RECORDS=100000
WORKERS=3
DURATION=30s
KILL_EVERY=1s
LEASE=3s
KEEP=0
WAIT_TIMEOUT=10m

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}
bad_usage() {
    printf 'chaos.sh: %s (see scripts/chaos.sh --help)\n' "$*" >&2
    exit 64
}

while [ $# -gt 0 ]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --keep) KEEP=1; shift; continue ;;
        --*=*) opt=${1%%=*} val=${1#*=}; shift ;;
        --records | --workers | --duration | --kill-every | --lease)
            [ $# -ge 2 ] || bad_usage "$1 needs a value"
            opt=$1 val=$2; shift 2 ;;
        *) bad_usage "unknown argument: $1" ;;
    esac
    case $opt in
        --records) RECORDS=$val ;;
        --workers) WORKERS=$val ;;
        --duration) DURATION=$val ;;
        --kill-every) KILL_EVERY=$val ;;
        --lease) LEASE=$val ;;
        *) bad_usage "unknown option: $opt" ;;
    esac
done

# A duration (500ms, 3s, 2m, or bare seconds) in milliseconds; empty if malformed.
to_ms() {
    case $1 in
        *[!0-9]*ms | ms) ;;
        *ms) echo "${1%ms}" ;;
        *[!0-9]*s | s) ;;
        *s) echo $((${1%s} * 1000)) ;;
        *[!0-9]*m | m) ;;
        *m) echo $((${1%m} * 60000)) ;;
        '' | *[!0-9]*) ;;
        *) echo $(($1 * 1000)) ;;
    esac
}
case $RECORDS in '' | *[!0-9]*) bad_usage "--records must be a positive number" ;; esac
case $WORKERS in '' | *[!0-9]*) bad_usage "--workers must be a positive number" ;; esac
[ "$RECORDS" -ge 1 ] || bad_usage "--records must be at least 1"
[ "$WORKERS" -ge 1 ] && [ "$WORKERS" -le 100 ] || bad_usage "--workers must be 1-100"
DURATION_MS=$(to_ms "$DURATION")
KILL_EVERY_MS=$(to_ms "$KILL_EVERY")
LEASE_MS=$(to_ms "$LEASE")
[ -n "$DURATION_MS" ] || bad_usage "--duration: expected e.g. 30s, 2m, 500ms"
[ -n "$KILL_EVERY_MS" ] && [ "$KILL_EVERY_MS" -ge 100 ] || bad_usage "--kill-every: expected e.g. 1s, 500ms (at least 100ms)"
[ -n "$LEASE_MS" ] && [ "$LEASE_MS" -ge 1000 ] || bad_usage "--lease: expected e.g. 3s (at least 1s)"

if [ -z "${DATABASE_URL:-}" ]; then
    cat >&2 <<'EOF'
chaos.sh: DATABASE_URL is not set. Point it at a database of yours (the tally schema is created
there if missing; the script only adds its own batch and a sink table it drops at the end):

    export DATABASE_URL=postgres://user:password@host:5432/dbname
    scripts/chaos.sh

No server at hand? scripts/pg-up.sh finds, starts or installs one and prints an admin URL:

    export DATABASE_URL=$(scripts/pg-up.sh)
    scripts/chaos.sh

or a throwaway cluster of its own (stop it later with scripts/pg-up.sh --stop DIR):

    export DATABASE_URL=$(scripts/pg-up.sh --throwaway /tmp/tally-chaos-pg 55434)
EOF
    exit 64
fi

RUN_ID="$(date +%Y%m%d%H%M%S)_$$"
BATCH="chaos-$RUN_ID"
QUEUE="chaos-$RUN_ID"
SINK="tally_chaos_sink_$RUN_ID"
# $1 = record id, bound by the worker, not by the shell.
# shellcheck disable=SC2016
SQL='insert into '"$SINK"' (record_id) select $1 from pg_sleep(0.002)'

export PGCONNECT_TIMEOUT=${PGCONNECT_TIMEOUT:-5}

# step, say, die, coord, q and field: see scripts/lib.sh.
# shellcheck source=scripts/lib.sh
. scripts/lib.sh  # the working directory is the repository root

# Milliseconds since the epoch (bash 5's EPOCHREALTIME, else date).
now_ms() {
    if [ -n "${EPOCHREALTIME:-}" ]; then
        local t=${EPOCHREALTIME/[.,]/}
        echo $((10#$t / 1000))
    else
        date +%s%3N
    fi
}
secs() { printf '%d.%01d' $(($1 / 1000)) $((($1 % 1000) / 100)); }

# ---------------------------------------------------------------------------
# processes we start, and how they are cleaned up
# ---------------------------------------------------------------------------
WORKDIR=""
WORKER_PIDS=()
WORKER_IDS=()
SINK_CREATED=0
BATCH_PREPARED=0
BATCH_DONE=0

# shellcheck disable=SC2317 # invoked through the EXIT trap
cleanup() {
    local rc=$? pid i any
    trap - EXIT INT TERM
    # Only the workers this script started, by pid: SIGTERM, up to 5 s, then SIGKILL.
    local alive=()
    for pid in "${WORKER_PIDS[@]}"; do
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            alive+=("$pid")
        fi
    done
    if [ ${#alive[@]} -gt 0 ]; then
        for ((i = 0; i < 50; i++)); do
            any=0
            for pid in "${alive[@]}"; do kill -0 "$pid" 2>/dev/null && any=1; done
            [ "$any" = 0 ] && break
            sleep 0.1
        done
        for pid in "${alive[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    fi
    # Interrupted half-way: cancel the batch so that no later worker picks it up.
    if [ "$BATCH_PREPARED" = 1 ] && [ "$BATCH_DONE" = 0 ]; then
        timeout --kill-after=5 30 "$COORD" cancel "$BATCH" >/dev/null 2>&1 &&
            printf 'chaos.sh: cancelled the unfinished batch %s\n' "$BATCH" >&2
    fi
    if [ "$SINK_CREATED" = 1 ] && [ "$KEEP" = 0 ]; then
        q -c "drop table if exists $SINK" 2>/dev/null || printf 'chaos.sh: could not drop %s\n' "$SINK" >&2
    fi
    if [ -n "$WORKDIR" ] && [ "$rc" != 0 ]; then
        printf 'chaos.sh: worker logs are in %s\n' "$WORKDIR" >&2
    elif [ -n "$WORKDIR" ]; then
        rm -rf -- "$WORKDIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM


# start_worker SLOT: starts a worker into WORKER_PIDS[SLOT].
NSTARTED=0
start_worker() {
    local slot=$1 id
    NSTARTED=$((NSTARTED + 1))
    id="chaos-$RUN_ID-w$NSTARTED"
    NO_COLOR=1 "$WORKER" --queue "$QUEUE" --handler sql --sql "$SQL" \
        --lease "$LEASE" --rescue-interval 1s --concurrency 4 \
        --worker-id "$id" >"$WORKDIR/$id.log" 2>&1 &
    WORKER_PIDS[slot]=$!
    WORKER_IDS[slot]=$id
}

# All workers still running, or die with the log of the one that is not.
assert_workers_running() {
    local i
    for i in "${!WORKER_PIDS[@]}"; do
        if ! kill -0 "${WORKER_PIDS[i]}" 2>/dev/null; then
            tail -n 20 "$WORKDIR/${WORKER_IDS[i]}.log" >&2 || true
            die "worker ${WORKER_IDS[i]} (pid ${WORKER_PIDS[i]}) exited on its own"
        fi
    done
}

# ---------------------------------------------------------------------------
step "Binaries"
command -v timeout >/dev/null 2>&1 || die "timeout (coreutils) not found"
command -v psql >/dev/null 2>&1 || die "psql not found: apt-get install postgresql-client"
if [ -n "${TALLY_BIN_DIR:-}" ]; then
    COORD="$TALLY_BIN_DIR/coordinator"
    WORKER="$TALLY_BIN_DIR/worker"
    [ -x "$COORD" ] && [ -x "$WORKER" ] || die "TALLY_BIN_DIR=$TALLY_BIN_DIR holds no coordinator and worker binaries"
    say "using $COORD and $WORKER (TALLY_BIN_DIR)"
else
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install Rust with https://rustup.rs, or set TALLY_BIN_DIR to prebuilt binaries"
    COORD="$ROOT/target/release/coordinator"
    WORKER="$ROOT/target/release/worker"
    timeout 1800 cargo build --release --bins --quiet
    say "built $COORD and $WORKER"
fi
WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/tally-chaos.XXXXXX")

step "coordinator migrate"
out=$(coord 120 migrate 2>&1) || { printf '%s\n' "$out" >&2; die "coordinator migrate failed (is DATABASE_URL right?)"; }
printf '%s\n' "$out" | sed 's/^/    /'

# ---------------------------------------------------------------------------
step "Sink table $SINK and batch $BATCH ($RECORDS records)"
q -c "create table $SINK (record_id text not null)"
SINK_CREATED=1
say "created $SINK (no unique constraint: a second effect shows up as a duplicate)"
BATCH_PREPARED=1
out=$(coord 900 prepare "$BATCH" --queue "$QUEUE" \
    --from-query "select 'c' || g as id from generate_series(1, $RECORDS) g" 2>&1) ||
    { printf '%s\n' "$out" >&2; die "coordinator prepare failed"; }
printf '%s\n' "$out" | sed 's/^/    /'

# ---------------------------------------------------------------------------
step "Start $WORKERS workers (sql handler, lease $LEASE, rescue interval 1s, concurrency 4)"
for ((i = 0; i < WORKERS; i++)); do
    start_worker "$i"
    say "${WORKER_IDS[i]}: pid ${WORKER_PIDS[i]}"
done
say "statement: $SQL"

# Wait for the first completed record, so that the kills hit a running batch.
t0=$(now_ms)
while :; do
    assert_workers_running
    json=$(coord 30 status "$BATCH" --json) || die "coordinator status failed"
    [ "$(field complete "$json")" -gt 0 ] 2>/dev/null && break
    [ $(($(now_ms) - t0)) -lt 60000 ] || die "no record completed within 60 s (see $WORKDIR)"
    sleep 0.2
done

# ---------------------------------------------------------------------------
step "Chaos: kill -9 one worker every $KILL_EVERY for $DURATION (round robin), start a replacement"
kills=0
last_kill=0
last_kill_db=""
finished_early=0
chaos_start=$(now_ms)
while :; do
    next=$((chaos_start + (kills + 1) * KILL_EVERY_MS))
    [ "$next" -le $((chaos_start + DURATION_MS)) ] || break
    delay=$((next - $(now_ms)))
    [ "$delay" -le 0 ] || sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
    assert_workers_running
    json=$(coord 30 status "$BATCH" --json) || die "coordinator status failed"
    state=$(field state "$json")
    case $state in complete | complete_with_failures | cancelled)
        finished_early=1
        say "${Y}the batch is $state already: no more kills (raise --records for a longer run)${N}"
        break ;;
    esac
    slot=$((kills % WORKERS))
    pid=${WORKER_PIDS[slot]}
    old=${WORKER_IDS[slot]}
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
    last_kill=$(now_ms)
    # The same moment on the server's clock, to compare with the records' updated_at.
    last_kill_db=$(q -c "select (extract(epoch from clock_timestamp()) * 1000)::bigint") || last_kill_db=""
    kills=$((kills + 1))
    start_worker "$slot"
    printf '    [%5ss] kill -9 %s (pid %s) at %s/%s complete; started %s (pid %s)\n' \
        "$(secs $((last_kill - chaos_start)))" "$old" "$pid" "$(field complete "$json")" \
        "$(field total "$json")" "${WORKER_IDS[slot]}" "${WORKER_PIDS[slot]}"
done

# ---------------------------------------------------------------------------
step "coordinator wait $BATCH --timeout $WAIT_TIMEOUT"
wait_rc=0
out=$(coord 660 wait "$BATCH" --timeout "$WAIT_TIMEOUT" --interval 100ms 2>"$WORKDIR/wait.err") || wait_rc=$?
done_at=$(now_ms)
printf '    %s\n' "$out"
[ "$wait_rc" = 0 ] || { sed 's/^/    /' "$WORKDIR/wait.err" >&2; say "${R}coordinator wait exited $wait_rc (0: all complete, 3: failures, 4: timeout)${N}"; }
[ "$wait_rc" = 4 ] || [ "$wait_rc" = 124 ] || [ "$wait_rc" = 137 ] || BATCH_DONE=1

step "Stop the workers with SIGTERM"
stop_rcs=()
for pid in "${WORKER_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
for i in "${!WORKER_PIDS[@]}"; do
    pid=${WORKER_PIDS[i]} rc=0
    for ((t = 0; t < 450; t++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        rc=timeout
    fi
    wait "$pid" 2>/dev/null || rc=$?
    stop_rcs+=("${WORKER_IDS[i]}: exit $rc")
done
say "${stop_rcs[*]}"

# ---------------------------------------------------------------------------
step "Result"
read -r total not_complete rescued absent finished_db < <(q -F ' ' -v batch="$BATCH" <<SQL
with b as (select id from tally.batch where name = :'batch'),
     r as (select r.record_id, r.state, r.attempt from tally.record r where r.batch_id = (select id from b))
select (select count(*) from r),
       (select count(*) from r where state <> 'complete'),
       (select count(*) from r where attempt > 1),
       (select count(*) from r where not exists (select 1 from $SINK s where s.record_id = r.record_id)),
       (select (extract(epoch from max(r.updated_at)) * 1000)::bigint from tally.record r
         where r.batch_id = (select id from b));
SQL
)
read -r sink_rows sink_distinct < <(q -F ' ' -c "select count(*), count(distinct record_id) from $SINK")
lost=$((not_complete + absent))
duplicated=$((sink_rows - sink_distinct))
if [ "$kills" = 0 ]; then
    recover="n/a (no kill)"
elif [ "$BATCH_DONE" = 1 ] && [ -n "$last_kill_db" ] && [ -n "$finished_db" ]; then
    # Server clock: the last record's completion minus the moment of the last kill.
    recover="$(secs $((finished_db - last_kill_db)))s from the last kill to batch complete"
    [ "$finished_early" = 0 ] || recover="$recover (it finished before --duration was over)"
elif [ "$BATCH_DONE" = 1 ]; then
    recover="$(secs $((done_at - last_kill)))s from the last kill to batch complete"
else
    recover="n/a (the batch did not finish)"
fi
printf '    %-18s %s\n' "records:" "$total (sink rows: $sink_rows)"
printf '    %-18s %s\n' "kills:" "$kills (kill -9, one every $KILL_EVERY for $DURATION, $WORKERS workers)"
printf '    %-18s %s\n' "rescued:" "$rescued (records with attempt > 1)"
printf '    %-18s %s\n' "lost:" "$lost ($not_complete not complete + $absent absent from the sink)"
printf '    %-18s %s\n' "duplicated:" "$duplicated (sink rows - distinct record ids)"
printf '    %-18s %s\n' "time to recover:" "$recover (lease $LEASE)"
[ "$KEEP" = 1 ] && say "kept the sink table $SINK (--keep)"

if [ "$lost" = 0 ] && [ "$duplicated" = 0 ] && [ "$total" = "$RECORDS" ]; then
    printf '\n    %sOK: every record applied exactly once, across %s kill -9.%s\n' "$G" "$kills" "$N"
    exit 0
fi
printf '\n    %sFAIL: lost %s, duplicated %s (worker logs: %s)%s\n' "$R" "$lost" "$duplicated" "$WORKDIR" "$N"
exit 1
