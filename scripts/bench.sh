#!/usr/bin/env bash
# bench.sh -- Tally throughput benchmark. Not a test: it measures and prints.
#
# Usage:
#   scripts/bench.sh [--compare] [N=1000000] [WORKERS=2]
#
# Phases (each timed on its own; the database is recreated first):
#   prepare_file   CHECKPOINT, then `coordinator prepare bench-file --queue bench --from-file F`
#                  with F = ${TMPDIR:-/tmp}/tally-bench/records_N.jsonl (generated once, reused):
#                  {"id":"r<i>","n":<i>,"pad":"<64 x>"} -- the payload of the shared sql_limit.sh
#   prepare_query  CHECKPOINT, then `coordinator prepare bench-query --queue bench-q --from-query
#                  "select 'r' || g as id, g as n, repeat('x', 64) as pad from generate_series(1, N) g"`
#   process        CHECKPOINT, then WORKERS x `worker --queue bench --handler noop --concurrency 64`,
#                  timed from their start until `coordinator wait bench-file` exits 0 (all N complete);
#                  then the workers get SIGTERM and must exit 0. Reports their peak RSS (VmHWM).
# Finally checks that the bench-file batch has exactly N complete records (else WARN, exit 1),
# then times TALLY_BENCH_SCRAPES (default 100) scrapes of `coordinator serve`'s /metrics and
# prints the database time per scrape (INFO serve_scrape ...).
#
# --compare (first argument): before the Tally phases, run the shared reference benchmarks of this
# machine -- sql_limit.sh N 2 1000 (pure-SQL claim ceiling) and peer_graphile_worker.sh N -- and end
# with a summary of every RESULT plus ratios measured in this same run:
#   tally_process / sql_claim_c2_k1000, tally_process / graphile_worker_work,
#   tally_prepare_file / sql_copy, tally_prepare_query / sql_insert_select.
# If a shared script fails, a WARN is printed and Tally's own numbers are still reported.
#
# Output: a header per phase and progress on stderr; RESULT / INFO / WARN / RATIO lines on stdout:
#   RESULT name=<x> rows=<n> seconds=<s> rows_per_s=<r>     (the format of the shared scripts)
#
# Environment:
#   DATABASE_URL          admin URL (a role that can CREATE DATABASE); default: scripts/pg-up.sh
#   TALLY_BENCH_DB        database to recreate (default tally_bench; dropped WITH (FORCE))
#   TALLY_BENCH_CONCURRENCY  --concurrency of each worker (default 64)
#   TALLY_BENCH_CLAIM        --claim-size of each worker (default 3000: fewer, larger claims)
#   TALLY_BENCH_TIMEOUT   seconds allowed per phase (default 1800)
#   TALLY_BENCH_SHARED    directory of the shared benchmarks (default <repo>/../shared/bench)
#   TMPDIR                input files, binaries snapshot and logs go to ${TMPDIR:-/tmp}/tally-bench
#   The worker also reads TALLY_CLAIM_SIZE, TALLY_LEASE, ... (see `worker --help`); explicit
#   flags given here (queue, handler, concurrency, database URL) win over them.
# Exit status: 0 when every phase ran and the batch is complete; 1 otherwise; 64 on bad usage.
set -euo pipefail

PROG=bench.sh
REPO="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
}

COMPARE=0
case "${1:-}" in
--compare)
    COMPARE=1
    shift
    ;;
-h | --help)
    usage
    exit 0
    ;;
esac
N="${1:-1000000}"
WORKERS="${2:-2}"
[ $# -le 2 ] || { usage; exit 64; }
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "$PROG: N must be a positive integer, got '$N'" >&2; exit 64; }
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || { echo "$PROG: WORKERS must be a positive integer, got '$WORKERS'" >&2; exit 64; }

DB="${TALLY_BENCH_DB:-tally_bench}"
[[ "$DB" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { echo "$PROG: bad TALLY_BENCH_DB '$DB'" >&2; exit 64; }
CONCURRENCY="${TALLY_BENCH_CONCURRENCY:-64}"
CLAIM="${TALLY_BENCH_CLAIM:-3000}"
PHASE_TIMEOUT="${TALLY_BENCH_TIMEOUT:-1800}"
WORK="${TMPDIR:-/tmp}/tally-bench"
RUN_DIR="$WORK/run-$(date +%Y%m%d-%H%M%S)-$$"
LOGS="$RUN_DIR/logs"
RESULTS="$RUN_DIR/results.txt"
mkdir -p "$LOGS"
: >"$RESULTS"

if [ -n "${TALLY_BENCH_SHARED:-}" ]; then
    SHARED="$TALLY_BENCH_SHARED"
else
    SHARED="$(dirname -- "$REPO")/shared/bench"
fi

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

phase() { printf '\n==> [bench] %s\n' "$*" >&2; }
note() { printf '[bench] %s\n' "$*" >&2; }
FAILED=0
warn() {
    echo "WARN $*"
    FAILED=1
}
die() {
    echo "WARN $*"
    exit 1
}

now_s() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
# result NAME ROWS SECONDS: prints a RESULT line and keeps it for the summary.
result() {
    awk -v n="$1" -v r="$2" -v s="$3" \
        'BEGIN{printf "RESULT name=%s rows=%d seconds=%.3f rows_per_s=%.0f\n", n, r, s, (s>0? r/s : 0)}' |
        tee -a "$RESULTS"
}
# never print a password
mask() { sed -E 's#(://[^:/@?]*:)[^@/?]*@#\1***@#; s#(password=)[^ &]*#\1***#g'; }

# The job currently run by run_bounded (a `timeout` process leading its own process group).
CHILD=""
# run_bounded SECS CMD...: runs CMD under timeout, in the background so that a trapped signal
# interrupts the wait at once; returns CMD's status (124 on timeout).
run_bounded() {
    local secs=$1 rc=0
    shift
    timeout -k 10 "$secs" "$@" </dev/null &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    return "$rc"
}

BIN="" # private copy of the binaries (set after the build)
WORKER_TPIDS=() # the `timeout` wrapping each worker
WORKER_PIDS=()  # the worker processes themselves

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
    local rc=$? p i
    trap - EXIT INT TERM
    if alive "$CHILD"; then
        note "stopping $CHILD"
        kill -TERM "$CHILD" 2>/dev/null || true # timeout forwards it to its process group
    fi
    for p in "${WORKER_PIDS[@]}" "${WORKER_TPIDS[@]}"; do
        if alive "$p"; then kill -TERM "$p" 2>/dev/null || true; fi
    done
    for ((i = 0; i < 100; i++)); do
        local any=0
        for p in "$CHILD" "${WORKER_PIDS[@]}" "${WORKER_TPIDS[@]}"; do
            if alive "$p"; then any=1; fi
        done
        [ "$any" = 1 ] || break
        sleep 0.1
    done
    for p in "$CHILD" "${WORKER_PIDS[@]}" "${WORKER_TPIDS[@]}"; do
        if alive "$p"; then
            note "killing $p"
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    # the binaries' snapshot is only needed while running; the logs stay
    if [ -n "${BIN:-}" ]; then rm -rf "$BIN"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# 0. the shared reference benchmarks (--compare)
# ---------------------------------------------------------------------------

# run_shared NAME EXPECTED_RESULT SECS SCRIPT ARGS...: runs a shared script, shows its output
# (RESULT/WARN lines on stdout, the rest on stderr) and keeps its RESULT lines.
run_shared() {
    local name=$1 expected=$2 secs=$3 script=$4 rc=0
    shift 4
    local log="$LOGS/$name.log"
    phase "compare: $name ($(basename "$script") $*; log $log)"
    if [ ! -f "$script" ]; then
        echo "WARN compare: $script not found (set TALLY_BENCH_SHARED); skipping $name"
        return 0
    fi
    local t0
    t0=$(date +%s)
    run_bounded "$secs" bash "$script" "$@" >"$log" 2>&1 || rc=$?
    note "$name finished in $(($(date +%s) - t0))s (exit $rc)"
    awk '/^(RESULT|WARN) /{print; next} {print "  | " $0 > "/dev/stderr"}' "$log"
    grep '^RESULT ' "$log" >>"$RESULTS" || true
    if [ "$rc" != 0 ]; then
        echo "WARN compare: $name exited $rc$([ "$rc" = 124 ] && echo " (timed out after ${secs}s)"); continuing with Tally's own numbers"
    elif ! grep -q "^RESULT name=$expected " "$log"; then
        echo "WARN compare: $name printed no RESULT name=$expected; continuing"
    fi
}

if [ "$COMPARE" = 1 ] && [ ! -d "$SHARED" ]; then
    echo "bench: --compare needs the shared benchmarks in $SHARED (../shared/bench beside the repository), or TALLY_BENCH_SHARED=DIR" >&2
    exit 64
fi
if [ "$COMPARE" = 1 ]; then
    run_shared sql_limit sql_claim_c2_k1000 "$PHASE_TIMEOUT" "$SHARED/sql_limit.sh" "$N" 2 1000
    run_shared graphile_worker graphile_worker_work "$PHASE_TIMEOUT" "$SHARED/peer_graphile_worker.sh" "$N"
fi

# ---------------------------------------------------------------------------
# 1. build, database
# ---------------------------------------------------------------------------

phase "build: cargo build --release --bins"
command -v cargo >/dev/null 2>&1 || die "cargo not found: install the Rust toolchain"
(cd "$REPO" && run_bounded "$PHASE_TIMEOUT" cargo build --release --bins) >&2 ||
    die "cargo build --release --bins failed"
# A private copy: a concurrent build by someone else must not swap the binaries mid-run.
BIN="$RUN_DIR/bin"
mkdir -p "$BIN"
cp "$REPO/target/release/coordinator" "$REPO/target/release/worker" "$BIN/"
REV="$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(cd "$REPO" && git status --porcelain --untracked-files=no 2>/dev/null)" ]; then REV="$REV+dirty"; fi

phase "database: $DB"
if [ -n "${DATABASE_URL:-}" ]; then
    ADMIN_URL="$DATABASE_URL"
else
    ADMIN_URL="$(run_bounded 600 "$REPO/scripts/pg-up.sh")" || die "scripts/pg-up.sh failed (see above)"
fi
[ -n "$ADMIN_URL" ] || die "no admin database URL"
case "$ADMIN_URL" in
postgres://* | postgresql://*)
    # scheme://authority[/db][?params] -> scheme://authority/DB[?params]
    BENCH_URL="$(printf '%s' "$ADMIN_URL" | sed -E "s#^(postgres(ql)?://[^/?]*)(/[^?]*)?(\\?.*)?\$#\\1/$DB\\4#")"
    ;;
*) BENCH_URL="$ADMIN_URL dbname=$DB" ;; # key=value form: the last dbname wins
esac
note "admin URL: $(printf '%s' "$ADMIN_URL" | mask); bench URL: $(printf '%s' "$BENCH_URL" | mask)"

export PGCONNECT_TIMEOUT="${PGCONNECT_TIMEOUT:-10}"
admin_psql() { run_bounded 300 psql -X -q -w -v ON_ERROR_STOP=1 -d "$ADMIN_URL" "$@"; }
P() { run_bounded 300 psql -X -q -w -v ON_ERROR_STOP=1 -d "$BENCH_URL" "$@"; }
Q() { P -At -c "$1"; }
checkpoint() { P -c checkpoint >/dev/null 2>&1 || echo "INFO checkpoint failed (role is not allowed?); continuing without"; }

admin_psql -c "set client_min_messages = warning" -c "drop database if exists \"$DB\" with (force)" -c "create database \"$DB\"" ||
    die "cannot recreate database $DB"
run_bounded 300 "$BIN/coordinator" --database-url "$BENCH_URL" migrate >&2 || die "coordinator migrate failed"

echo "INFO tally_rev=$REV N=$N workers=$WORKERS concurrency=$CONCURRENCY claim=$CLAIM db=$DB compare=$COMPARE run_dir=$RUN_DIR"
echo "INFO $(Q "select 'server=' || split_part(version(), ' ', 2) || ' ' || string_agg(name || '=' || setting || coalesce(unit,''), ' ' order by name) from pg_settings where name in ('shared_buffers','synchronous_commit','fsync','max_wal_size','autovacuum','wal_sync_method','max_connections')")"
echo "INFO cpus=$(nproc) mem=$(free -g | awk '/Mem:/{print $2}')GiB loadavg=$(cut -d' ' -f1-3 /proc/loadavg | tr ' ' ,)"

# ---------------------------------------------------------------------------
# 2. input file
# ---------------------------------------------------------------------------

FILE="$WORK/records_$N.jsonl"
if [ -s "$FILE" ] && [ "$(wc -l <"$FILE")" -eq "$N" ]; then
    note "reusing $FILE"
else
    phase "generate $FILE"
    tmp="$FILE.tmp.$$"
    run_bounded "$PHASE_TIMEOUT" awk -v n="$N" 'BEGIN {
        pad = sprintf("%64s", ""); gsub(/ /, "x", pad)
        for (i = 1; i <= n; i++) printf "{\"id\":\"r%d\",\"n\":%d,\"pad\":\"%s\"}\n", i, i, pad
    }' >"$tmp" || { rm -f "$tmp"; die "generating $FILE failed"; }
    mv "$tmp" "$FILE"
fi
echo "INFO input=$FILE bytes=$(stat -c %s "$FILE")"

# ---------------------------------------------------------------------------
# stats helpers
# ---------------------------------------------------------------------------

# table_stats TABLE -> "n_live_tup=.. n_dead_tup=.. n_tup_upd=.. n_tup_hot_upd=.. ..."
table_stats() {
    Q "select 'n_live_tup=' || n_live_tup || ' n_dead_tup=' || n_dead_tup || ' n_tup_upd=' || n_tup_upd
             || ' n_tup_hot_upd=' || n_tup_hot_upd || ' autovacuum_count=' || autovacuum_count
             || ' autoanalyze_count=' || autoanalyze_count
         from pg_stat_user_tables where relid = '$1'::regclass"
}
stat_field() { printf '%s\n' "$1" | tr ' ' '\n' | awk -F= -v k="$2" '$1==k{print $2}'; }
sizes() { # sizes LABEL
    echo "INFO size_$1 table=$(Q "select pg_size_pretty(pg_table_size('tally.record'))") indexes=$(Q "select pg_size_pretty(pg_indexes_size('tally.record'))") total=$(Q "select pg_size_pretty(pg_total_relation_size('tally.record'))") rows_in_table=$(Q "select count(*) from tally.record")"
    echo "INFO index_sizes $(Q "select string_agg(indexrelid::regclass || '=' || pg_size_pretty(pg_relation_size(indexrelid)), ' ' order by indexrelid::regclass::text) from pg_index where indrelid = 'tally.record'::regclass")"
}

# prepare_phase NAME RESULT_NAME ARGS...: times one `coordinator prepare`.
prepare_phase() {
    local name=$1 res=$2 rc=0 t0 t1
    shift 2
    local log="$LOGS/$name.log"
    phase "$name: coordinator prepare $*"
    checkpoint
    t0=$(now_s)
    run_bounded "$PHASE_TIMEOUT" "$BIN/coordinator" --database-url "$BENCH_URL" prepare "$@" >"$log" 2>&1 || rc=$?
    t1=$(now_s)
    sed 's/^/  | /' "$log" >&2
    [ "$rc" = 0 ] || die "$name: coordinator prepare exited $rc (log $log)"
    result "$res" "$N" "$(elapsed "$t0" "$t1")"
}

# ---------------------------------------------------------------------------
# 3-4. prepare
# ---------------------------------------------------------------------------

prepare_phase prepare_file tally_prepare_file bench-file --queue bench --from-file "$FILE"
sizes after_prepare_file
prepare_phase prepare_query tally_prepare_query bench-query --queue bench-q \
    --from-query "select 'r' || g as id, g as n, repeat('x', 64) as pad from generate_series(1, $N) g"

# ---------------------------------------------------------------------------
# 5. process
# ---------------------------------------------------------------------------

phase "process: $WORKERS x worker --queue bench --handler noop --concurrency $CONCURRENCY --claim-size $CLAIM"
checkpoint
before="$(table_stats tally.record)"
count_before="$(table_stats tally.batch_count)"
sleep 0.2

t0=$(now_s)
for ((w = 1; w <= WORKERS; w++)); do
    NO_COLOR=1 timeout -k 10 $((PHASE_TIMEOUT + 120)) "$BIN/worker" --database-url "$BENCH_URL" --queue bench \
        --handler noop --concurrency "$CONCURRENCY" --claim-size "$CLAIM" --worker-id "bench-w$w" \
        </dev/null >"$LOGS/worker-$w.log" 2>&1 &
    WORKER_TPIDS+=("$!")
done
# the worker under each timeout (timeout forks it at once)
for tp in "${WORKER_TPIDS[@]}"; do
    wp=""
    for ((i = 0; i < 100; i++)); do
        wp="$(pgrep -P "$tp" | head -n1 || true)"
        [ -z "$wp" ] || break
        alive "$tp" || break
        sleep 0.01
    done
    [ -n "$wp" ] || die "process: a worker did not start (log $LOGS/)"
    WORKER_PIDS+=("$wp")
done
note "workers: ${WORKER_PIDS[*]} (logs $LOGS/worker-*.log)"

wait_rc=0
run_bounded $((PHASE_TIMEOUT + 30)) "$BIN/coordinator" --database-url "$BENCH_URL" \
    wait bench-file --interval 50ms --timeout "${PHASE_TIMEOUT}s" >"$LOGS/wait.log" 2>&1 || wait_rc=$?
t1=$(now_s)
sed 's/^/  | /' "$LOGS/wait.log" >&2

# peak RSS and CPU time, just before stopping them
rss_max=0
rss_each=()
cpu_each=()
tck=$(getconf CLK_TCK)
for wp in "${WORKER_PIDS[@]}"; do
    rss="$(awk '/^VmHWM:/{print $2}' "/proc/$wp/status" 2>/dev/null || true)"
    cpu="$(awk -v t="$tck" '{sub(/^.*\) /, ""); printf "%.1f", ($12 + $13) / t}' "/proc/$wp/stat" 2>/dev/null || true)"
    rss_each+=("${rss:-gone}")
    cpu_each+=("${cpu:-gone}")
    if [ -n "$rss" ] && [ "$rss" -gt "$rss_max" ]; then rss_max=$rss; fi
done

for wp in "${WORKER_PIDS[@]}"; do kill -TERM "$wp" 2>/dev/null || true; done
deadline=$(($(date +%s) + 60))
for i in "${!WORKER_TPIDS[@]}"; do
    tp=${WORKER_TPIDS[$i]}
    while alive "$tp" && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.05; done
    if alive "$tp"; then
        warn "process: worker ${WORKER_PIDS[$i]} still running 60s after SIGTERM; killing it"
        kill -KILL "${WORKER_PIDS[$i]}" 2>/dev/null || true
    fi
    rc=0
    wait "$tp" || rc=$?
    [ "$rc" = 0 ] || warn "process: worker $((i + 1)) (pid ${WORKER_PIDS[$i]}) exited $rc (log $LOGS/worker-$((i + 1)).log)"
done
WORKER_PIDS=()
WORKER_TPIDS=()

if [ "$wait_rc" = 0 ]; then
    result "tally_process_noop_w$WORKERS" "$N" "$(elapsed "$t0" "$t1")"
else
    warn "process: coordinator wait bench-file exited $wait_rc (0 = complete, 3 = failures, 4 = timeout after ${PHASE_TIMEOUT}s)"
fi
echo "INFO worker_peak_rss_kib=$rss_max (per worker: ${rss_each[*]}) worker_cpu_s=(${cpu_each[*]})"
completed=()
for ((w = 1; w <= WORKERS; w++)); do
    c="$(sed 's/\x1b\[[0-9;]*m//g' "$LOGS/worker-$w.log" | grep -o 'completed: [0-9]*' | tail -n1 | cut -d' ' -f2 || true)"
    completed+=("${c:-?}")
done
echo "INFO worker_completed=(${completed[*]})"
problems="$(sed 's/\x1b\[[0-9;]*m//g' "$LOGS"/worker-*.log | grep -E ' (WARN|ERROR) ' || true)"
if [ -n "$problems" ]; then
    echo "INFO worker_log_warnings=$(printf '%s\n' "$problems" | wc -l) (last ones on stderr)"
    printf '%s\n' "$problems" | tail -n 5 | sed 's/^/  | /' >&2
fi

sleep 1 # let the workers' backends flush their statistics
after="$(table_stats tally.record)"
count_after="$(table_stats tally.batch_count)"
d_upd=$(($(stat_field "$after" n_tup_upd) - $(stat_field "$before" n_tup_upd)))
d_hot=$(($(stat_field "$after" n_tup_hot_upd) - $(stat_field "$before" n_tup_hot_upd)))
echo "INFO pg_stat_user_tables tally.record $after"
echo "INFO process_delta tally.record n_tup_upd=+$d_upd n_tup_hot_upd=+$d_hot updates_per_record=$(awk -v u="$d_upd" -v n="$N" 'BEGIN{printf "%.2f", u/n}')"
echo "INFO pg_stat_user_tables tally.batch_count $count_after (n_tup_upd during process: +$(($(stat_field "$count_after" n_tup_upd) - $(stat_field "$count_before" n_tup_upd))))"
sizes after_process

# ---------------------------------------------------------------------------
# 6. correctness
# ---------------------------------------------------------------------------

phase "check: bench-file has $N complete records"
complete="$(Q "select count(*) from tally.record where batch_id = (select id from tally.batch where name = 'bench-file') and state = 'complete'")"
if [ "$complete" = "$N" ]; then
    echo "INFO check_ok complete=$complete of $N"
else
    warn "check: $complete of $N records of batch bench-file are complete ($(Q "select string_agg(state || '=' || c, ' ') from (select state, count(*) c from tally.record where batch_id = (select id from tally.batch where name = 'bench-file') group by 1) x"))"
fi

# ---------------------------------------------------------------------------
# 6b. coordinator serve: database time of a /metrics scrape next to the 1M-record batches
# ---------------------------------------------------------------------------

# http_get HOST PORT PATH: the response of one HTTP/1.0 GET (bash's /dev/tcp; no curl needed).
http_get() {
    exec 3<>"/dev/tcp/$1/$2" || return 1
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$3" "$1" >&3
    cat <&3
    exec 3<&-
}
SCRAPES="${TALLY_BENCH_SCRAPES:-100}"
phase "serve: $SCRAPES scrapes of /metrics (bench-file: $N complete; bench-query: $N pending)"
"$BIN/coordinator" --database-url "$BENCH_URL" serve --listen 127.0.0.1:0 --check-interval 1h \
    </dev/null >"$LOGS/serve.log" 2>&1 &
serve_pid=$!
WORKER_PIDS=("$serve_pid") # so that cleanup stops it if the bench is interrupted
addr=""
for ((i = 0; i < 100; i++)); do
    addr="$(awk '/listening on/{print $NF; exit}' "$LOGS/serve.log")"
    [ -z "$addr" ] || break
    alive "$serve_pid" || break
    sleep 0.1
done
if [ -z "$addr" ]; then
    warn "serve: coordinator serve did not start (log $LOGS/serve.log)"
else
    host="${addr%:*}"
    port="${addr##*:}"
    t0=$(now_s)
    for ((i = 0; i < SCRAPES; i++)); do http_get "$host" "$port" /metrics >"$LOGS/metrics.txt"; done
    t1=$(now_s)
    http_get "$host" "$port" /metrics >"$LOGS/metrics.txt"
    db_ms="$(awk '/^tally_serve_scrape_duration_seconds_sum /{s=$2} /^tally_serve_scrape_duration_seconds_count /{c=$2}
        END{if (c > 0) printf "%.3f", 1000 * s / c; else print "n/a"}' "$LOGS/metrics.txt")"
    grep -q '^tally_serve_up 1' "$LOGS/metrics.txt" || warn "serve: tally_serve_up is not 1 (see $LOGS/metrics.txt)"
    grep -q "^tally_batch_records{batch=\"bench-file\",queue=\"bench\",state=\"complete\"} $N\$" "$LOGS/metrics.txt" ||
        warn "serve: /metrics does not show $N complete records of bench-file (see $LOGS/metrics.txt)"
    # The server's own view of the same statement: execution time and pages touched.
    explain="$(P -At -c "prepare scrape(float8) as $(cat "$REPO/sql/queries/serve_scrape.sql")" \
        -c "explain (analyze, buffers, format json) execute scrape(86400)" 2>&1 || true)"
    exec_ms="$(printf '%s\n' "$explain" | grep -o '"Execution Time": [0-9.]*' | awk '{print $3}' | head -n1)"
    pages="$(printf '%s\n' "$explain" | awk '/"Plan": \{/{top=1} top && /"Shared Hit Blocks"|"Shared Read Blocks"/{gsub(/[^0-9]/, "", $0); n += $0; seen++} seen == 2{print n; exit}')"
    echo "INFO serve_scrape scrapes=$SCRAPES db_ms_per_scrape=$db_ms (serve's tally_serve_scrape_duration_seconds, round trips included) http_ms_per_scrape=$(awk -v a="$t0" -v b="$t1" -v n="$SCRAPES" 'BEGIN{printf "%.3f", 1000 * (b - a) / n}') explain_analyze_ms=${exec_ms:-n/a} pages=${pages:-n/a}"
fi
kill -TERM "$serve_pid" 2>/dev/null || true
wait "$serve_pid" 2>/dev/null || true
WORKER_PIDS=()

# ---------------------------------------------------------------------------
# 7. summary
# ---------------------------------------------------------------------------

phase "summary"
echo "SUMMARY N=$N workers=$WORKERS tally_rev=$REV"
awk '{
    for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    printf "SUMMARY   %-28s %10s rows %10s s %12s rows/s\n", f["name"], f["rows"], f["seconds"], f["rows_per_s"]
}' "$RESULTS"
# ratio NUM DEN: rows/s of NUM over rows/s of DEN, both measured in this run
rps() { awk -v k="$1" '{for (i = 2; i <= NF; i++) if ($i == "name=" k) {split($NF, kv, "="); v = kv[2]}} END{print v}' "$RESULTS"; }
ratio() {
    local a b
    a="$(rps "$1")"
    b="$(rps "$2")"
    if [ -n "$a" ] && [ -n "$b" ] && [ "$b" != 0 ]; then
        echo "RATIO $1/$2=$(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.3f", a/b}') ($a vs $b rows/s)"
    else
        echo "RATIO $1/$2=n/a (missing result)"
    fi
}
if [ "$COMPARE" = 1 ]; then
    ratio "tally_process_noop_w$WORKERS" sql_claim_c2_k1000
    ratio "tally_process_noop_w$WORKERS" graphile_worker_work
    ratio tally_prepare_file sql_copy
    ratio tally_prepare_query sql_insert_select
fi
note "logs: $LOGS"
exit "$FAILED"
