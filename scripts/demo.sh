#!/usr/bin/env bash
# demo.sh -- Tally in two minutes: 200,000 orders, three workers, one of them killed.
#
#   scripts/demo.sh
#
# What it does:
#   1. builds the release binaries (target/release/{coordinator,worker});
#   2. uses $DATABASE_URL if set; otherwise starts a throwaway PostgreSQL cluster in
#      ${TMPDIR:-/tmp}/tally-demo-pg on 127.0.0.1:55433 (scripts/pg-up.sh --throwaway) and
#      (re)creates the database tally_demo in it;
#   3. `coordinator migrate`; writes 200,000 JSONL orders, 7 of which name a customer that
#      does not exist; (re)creates the demo tables demo_customers and demo_orders;
#   4. `coordinator prepare` a batch orders-<unix time>, starts 3 workers with the sql
#      handler (an INSERT into demo_orders, committed with each record's completion);
#   5. kill -9 one worker at about a third of the way: its leased rows are rescued by the
#      others once the 5 s lease has expired;
#   6. `coordinator wait` exits 3 (finished with failures); `coordinator failed` shows the
#      7 foreign-key violations; the missing customer is added, `retry-failed`, and
#      `coordinator wait` exits 0;
#   7. stops the 2 surviving workers with SIGTERM (they exit 0) and checks the result:
#      every order is in demo_orders exactly once. Exits non-zero if any check fails.
#
# With $DATABASE_URL set, only the demo's own tables (demo_customers, demo_orders) are dropped
# and recreated there, next to the tally schema; workers take records from the queue "orders".
#
# Environment:
#   DATABASE_URL       use this server and database instead of a throwaway cluster
#   TALLY_DEMO_STOP=1  stop the throwaway cluster at the end (default: leave it running)
#   TALLY_DEMO_RECORDS number of orders (default 200000)
#
# Needs: bash, a Rust toolchain (cargo), awk, coreutils; psql is installed with apt-get if
# missing (root or passwordless sudo), and so is PostgreSQL when no DATABASE_URL is given.
set -euo pipefail

cd "$(dirname -- "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd -P)

RECORDS=${TALLY_DEMO_RECORDS:-200000}
case $RECORDS in '' | *[!0-9]*) RECORDS=0 ;; esac
BAD_CUSTOMER=9999
BAD_EVERY=$((RECORDS / 7)) # 7 orders name customer 9999
QUEUE=orders
BATCH="orders-$(date +%s)-$$"
LEASE=5s
WAIT_TIMEOUT=10m
PG_DIR="${TMPDIR:-/tmp}/tally-demo-pg"
PG_PORT=55433
COORD="$ROOT/target/release/coordinator"
WORKER="$ROOT/target/release/worker"
# $1 record id, $2 payload (jsonb), $3 batch name: bound by the worker, not by the shell.
# shellcheck disable=SC2016
SQL='insert into demo_orders (order_id, customer_id, amount, batch) values ($1, ($2->>'"'"'customer_id'"'"')::int, ($2->>'"'"'amount'"'"')::numeric, $3)'

export PGCONNECT_TIMEOUT=${PGCONNECT_TIMEOUT:-5}

# step, say, die, coord, q and field: see scripts/lib.sh.
# shellcheck source=scripts/lib.sh
. scripts/lib.sh  # the working directory is the repository root

# ---------------------------------------------------------------------------
# processes we start, and how they are cleaned up
# ---------------------------------------------------------------------------
WORKDIR=""
WORKER_PIDS=()
STARTED_THROWAWAY=0
OK=0

cleanup() {
    local rc=$? pid alive i
    trap - EXIT INT TERM
    # Only the workers this script started, by pid.
    alive=()
    for pid in "${WORKER_PIDS[@]}"; do
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            alive+=("$pid")
        fi
    done
    if [ ${#alive[@]} -gt 0 ]; then
        for ((i = 0; i < 50; i++)); do
            local any=0
            for pid in "${alive[@]}"; do kill -0 "$pid" 2>/dev/null && any=1; done
            [ "$any" = 0 ] && break
            sleep 0.1
        done
        for pid in "${alive[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    fi
    if [ -n "$WORKDIR" ]; then
        rm -f -- "$WORKDIR/orders.jsonl"
        if [ "$OK" != 1 ]; then
            printf 'demo.sh: worker logs are in %s\n' "$WORKDIR" >&2
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

Q_TIMEOUT_S=60

# Rows of the batch held (state running) by one worker id.
held_by() {
    q -v batch="$BATCH" -v owner="$1" <<'SQL'
select count(*) from tally.record r join tally.batch b on b.id = r.batch_id
 where b.name = :'batch' and r.state = 'running' and r.lease_owner = :'owner';
SQL
}

status_json() { coord 30 status "$BATCH" --json; }

# One compact line from `coordinator status --json`.
progress_line() {
    local json=$1 total complete failed running pending rate pct
    total=$(field total "$json")
    complete=$(field complete "$json")
    failed=$(field failed "$json")
    running=$(field running "$json")
    pending=$(field pending "$json")
    rate=$(field rate_per_s "$json")
    pct=$((total > 0 ? complete * 100 / total : 0))
    if [ -z "$rate" ] || [ "$rate" = null ]; then rate='-'; else rate=$(printf '%.0f' "$rate"); fi
    printf '    [%3ss] %7s/%s complete (%2s%%)  failed %s  running %5s  pending %6s  %6s/s on average\n' \
        "$SECONDS" "$complete" "$total" "$pct" "$failed" "$running" "$pending" "$rate"
}

# wait_for_exit PID SECONDS -> the process's exit code; kills it and returns 124 on timeout.
wait_for_exit() {
    local pid=$1 limit=$2 i rc=0
    for ((i = 0; i < limit * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        return 124
    fi
    wait "$pid" || rc=$?
    return "$rc"
}

apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "$1 is missing and apt-get is not available: install $1"
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; then
            die "$1 is missing: install it (apt-get install $1) or run as root"
        fi
        sudo=(sudo -n)
    fi
    say "installing $1 with apt-get"
    "${sudo[@]}" apt-get update -qq >/dev/null
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
    hash -r
}

[ "$RECORDS" -ge 1000 ] || { echo "demo.sh: TALLY_DEMO_RECORDS must be a number >= 1000" >&2; exit 64; }

# ---------------------------------------------------------------------------
step "Build (cargo build --release --bins)"
command -v cargo >/dev/null 2>&1 ||
    die "cargo not found: install Rust with https://rustup.rs (and build-essential for the linker), then re-run"
command -v timeout >/dev/null 2>&1 || die "timeout (coreutils) not found"
command -v awk >/dev/null 2>&1 || die "awk not found"
command -v psql >/dev/null 2>&1 || apt_install postgresql-client
cargo build --release --bins --quiet
say "built $COORD and $WORKER"

WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/tally-demo.XXXXXX")

# ---------------------------------------------------------------------------
step "PostgreSQL"
if [ -z "${DATABASE_URL:-}" ]; then
    say "DATABASE_URL is not set: starting a throwaway cluster in $PG_DIR on port $PG_PORT"
    admin_url=$(scripts/pg-up.sh --throwaway "$PG_DIR" "$PG_PORT" 2>"$WORKDIR/pg-up.log") || {
        sed 's/^/    | /' "$WORKDIR/pg-up.log" >&2
        die "scripts/pg-up.sh --throwaway failed"
    }
    STARTED_THROWAWAY=1
    case $admin_url in
    */postgres) DATABASE_URL="${admin_url%/postgres}/tally_demo" ;;
    *) die "unexpected URL from scripts/pg-up.sh: $admin_url" ;;
    esac
    PGOPTIONS='-c statement_timeout=60s -c client_min_messages=warning' timeout 90 psql -X -q -v ON_ERROR_STOP=1 -d "$admin_url" \
        -c 'drop database if exists tally_demo with (force)' \
        -c 'create database tally_demo'
    say "created database tally_demo"
else
    say "using DATABASE_URL (only the tables demo_customers and demo_orders are dropped and recreated)"
fi
export DATABASE_URL
say "database: $(printf '%s' "$DATABASE_URL" | sed -E 's#(://[^:/@?]*:)[^@/?]*@#\1***@#')"

# ---------------------------------------------------------------------------
step "coordinator migrate"
coord 60 migrate | sed 's/^/    /'

# ---------------------------------------------------------------------------
step "Input: $RECORDS orders as JSONL; 7 of them name customer $BAD_CUSTOMER, who does not exist"
ORDERS="$WORKDIR/orders.jsonl"
awk -v n="$RECORDS" -v every="$BAD_EVERY" -v bad="$BAD_CUSTOMER" 'BEGIN {
    for (i = 1; i <= n; i++) {
        c = (i * 7919) % 1000 + 1
        if (i % every == 0 && i / every <= 7) c = bad
        printf "{\"id\":\"order-%06d\",\"customer_id\":%d,\"amount\":%d.%02d}\n", i, c, (i * 37) % 1000 + 1, i % 100
    }
}' >"$ORDERS"
say "$(wc -l <"$ORDERS") lines in $ORDERS, e.g."
say "$(head -n 1 "$ORDERS")"
say "$(grep -m 1 "\"customer_id\":$BAD_CUSTOMER," "$ORDERS")"

# ---------------------------------------------------------------------------
step "Target tables: demo_customers (1..1000) and demo_orders (foreign key, no unique key)"
q <<SQL
drop table if exists demo_orders;
drop table if exists demo_customers;
create table demo_customers (id int primary key, name text);
insert into demo_customers select i, 'customer ' || i from generate_series(1, 1000) i;
create table demo_orders (
    order_id    text not null,   -- deliberately not unique: a duplicate would show
    customer_id int not null references demo_customers (id),
    amount      numeric not null,
    batch       text not null
);
create index on demo_orders (batch);
SQL
say "demo_customers: $(q -c 'select count(*) from demo_customers') rows; demo_orders: empty"

# ---------------------------------------------------------------------------
step "coordinator prepare $BATCH --queue $QUEUE --from-file orders.jsonl"
coord 300 prepare "$BATCH" --queue "$QUEUE" --from-file "$ORDERS" | sed 's/^/    /'

# ---------------------------------------------------------------------------
step "Start 3 workers (sql handler, lease $LEASE, concurrency 4)"
for i in 1 2 3; do
    NO_COLOR=1 "$WORKER" --queue "$QUEUE" --handler sql --sql "$SQL" \
        --lease "$LEASE" --rescue-interval 1s --concurrency 4 \
        --worker-id "demo-worker-$i" >"$WORKDIR/worker-$i.log" 2>&1 &
    WORKER_PIDS+=("$!")
    say "worker $i: pid ${WORKER_PIDS[$((i - 1))]}, log $WORKDIR/worker-$i.log"
done
say "statement: $SQL"

# ---------------------------------------------------------------------------
step "Progress (coordinator status $BATCH --json, once a second)"
SECONDS=0
killed=0
last_print=-1
while :; do
    json=$(status_json) || die "coordinator status failed"
    state=$(field state "$json")
    total=$(field total "$json")
    complete=$(field complete "$json")
    kill_now=0
    if [ "$killed" = 0 ] && [ $((complete * 100)) -ge $((total * 30)) ]; then kill_now=1; fi
    if [ "$SECONDS" != "$last_print" ] || [ "$kill_now" = 1 ]; then
        progress_line "$json"
        last_print=$SECONDS
    fi
    case $state in complete | complete_with_failures | cancelled) break ;; esac
    if [ "$kill_now" = 1 ]; then
        # Kill it while it holds leased rows: it is idle for a moment between two claims, so
        # freeze it (SIGSTOP), look, and let it go on (SIGCONT) until it holds some. A frozen
        # process cannot finish anything, so what it holds now is what the kill leaves behind.
        pid2=${WORKER_PIDS[1]}
        for ((try = 0; try < 20; try++)); do
            kill -STOP "$pid2"
            sleep 0.1
            [ "$(held_by demo-worker-2)" -gt 0 ] && break
            kill -CONT "$pid2"
            sleep 0.1
        done
        kill -KILL "$pid2"
        wait "$pid2" 2>/dev/null || true
        killed=1
        held=$(held_by demo-worker-2)
        printf '    %s>>> kill -9 worker 2 (pid %s) at %s%% complete: it held %s records under lease.%s\n' \
            "$Y" "$pid2" $((complete * 100 / total)) "$held" "$N"
        printf '    %s>>> They stay "running" until the %s lease expires; then the other workers rescue them.%s\n' \
            "$Y" "$LEASE" "$N"
    fi
    [ "$SECONDS" -lt 300 ] || die "the batch did not finish within 300 s"
    if [ "$killed" = 0 ]; then sleep 0.25; else sleep 1; fi
done
[ "$killed" = 1 ] || die "the batch finished before worker 2 could be killed (raise TALLY_DEMO_RECORDS)"

# ---------------------------------------------------------------------------
step "coordinator wait $BATCH --timeout $WAIT_TIMEOUT"
rc=0
out=$(coord 660 wait "$BATCH" --timeout "$WAIT_TIMEOUT" 2>"$WORKDIR/wait.err") || rc=$?
printf '    %s\n' "$out"
[ "$rc" = 3 ] || { cat "$WORKDIR/wait.err" >&2; die "coordinator wait exited $rc; expected 3 (finished with failures)"; }
say "${G}exit code 3: the batch finished, and some records failed${N}"

step "coordinator failed $BATCH"
coord 30 failed "$BATCH" | sed 's/^/    /'
nfailed=$(field failed "$(status_json)")
[ "$nfailed" = 7 ] || die "expected 7 failed records, found $nfailed"

# ---------------------------------------------------------------------------
step "Fix the cause: add customer $BAD_CUSTOMER, then coordinator retry-failed $BATCH"
q -c "insert into demo_customers values ($BAD_CUSTOMER, 'late customer')"
say "inserted customer $BAD_CUSTOMER into demo_customers"
coord 30 retry-failed "$BATCH" | sed 's/^/    /'
say "the running workers are woken by NOTIFY and take the 7 records again"

step "coordinator wait $BATCH --timeout $WAIT_TIMEOUT"
rc=0
out=$(coord 660 wait "$BATCH" --timeout "$WAIT_TIMEOUT" 2>"$WORKDIR/wait.err") || rc=$?
printf '    %s\n' "$out"
[ "$rc" = 0 ] || cat "$WORKDIR/wait.err" >&2
[ "$rc" = 0 ] || die "coordinator wait exited $rc; expected 0 (every record complete)"
say "${G}exit code 0: every record is complete${N}"

# ---------------------------------------------------------------------------
step "Stop the 2 surviving workers with SIGTERM"
for i in 1 3; do
    pid=${WORKER_PIDS[$((i - 1))]}
    kill -TERM "$pid"
done
for i in 1 3; do
    pid=${WORKER_PIDS[$((i - 1))]}
    rc=0
    wait_for_exit "$pid" 45 || rc=$?
    [ "$rc" = 0 ] || die "worker $i exited $rc after SIGTERM; expected 0 (see $WORKDIR/worker-$i.log)"
    say "worker $i (pid $pid) exited 0"
done
for i in 1 2 3; do
    summary=$(sed -e 's/\x1b\[[0-9;]*m//g' "$WORKDIR/worker-$i.log" |
        sed -n -E 's/.*worker stopped.*RunSummary \{ (.*) \}.*/\1/p' | tail -n 1)
    say "worker $i: ${summary:-killed with -9, no summary}"
done

# ---------------------------------------------------------------------------
step "Proof"
json=$(status_json)
total=$(field total "$json")
read -r rows distinct < <(q -F ' ' -v batch="$BATCH" <<'SQL'
select count(*), count(distinct order_id) from demo_orders where batch = :'batch';
SQL
)
dups=$((rows - distinct))
missing=$((total - distinct))
printf '    %-34s %s\n' "records in batch $BATCH:" "$total"
printf '    %-34s %s\n' "rows in demo_orders for the batch:" "$rows"
printf '    %-34s %s\n' "distinct order_id:" "$distinct"
printf '    %-34s %s\n' "duplicates (rows - distinct):" "$dups"
printf '    %-34s %s\n' "missing (records - distinct):" "$missing"
say "tally.record by state:"
q -F ' ' -v batch="$BATCH" <<'SQL' | awk '{printf "        %-10s %s\n", $1, $2}'
select r.state, count(*) from tally.record r join tally.batch b on b.id = r.batch_id
 where b.name = :'batch' group by r.state order by r.state;
SQL
say "tally.record by attempt (attempt 2+: rescued from worker 2, or retried after the fix):"
q -F ' ' -v batch="$BATCH" <<'SQL' | awk '{printf "        attempt %-3s %s\n", $1, $2}'
select r.attempt, count(*) from tally.record r join tally.batch b on b.id = r.batch_id
 where b.name = :'batch' group by r.attempt order by r.attempt;
SQL
not_complete=$(q -v batch="$BATCH" <<'SQL'
select count(*) from tally.record r join tally.batch b on b.id = r.batch_id
 where b.name = :'batch' and r.state <> 'complete';
SQL
)
stray=$(q -v batch="$BATCH" <<'SQL'
select count(*) from demo_orders o where o.batch = :'batch' and not exists (
    select 1 from tally.record r join tally.batch b on b.id = r.batch_id
     where b.name = :'batch' and r.record_id = o.order_id);
SQL
)

problems=()
[ "$total" = "$RECORDS" ] || problems+=("the batch holds $total records, not $RECORDS")
[ "$rows" = "$total" ] || problems+=("demo_orders holds $rows rows for $total records")
[ "$dups" = 0 ] || problems+=("$dups duplicate order rows")
[ "$missing" = 0 ] || problems+=("$missing orders missing")
[ "$not_complete" = 0 ] || problems+=("$not_complete records are not complete")
[ "$stray" = 0 ] || problems+=("$stray rows in demo_orders match no record of the batch")
if [ ${#problems[@]} -gt 0 ]; then
    for p in "${problems[@]}"; do printf '    %sFAIL: %s%s\n' "$R" "$p" "$N"; done
    die "the proof does not hold"
fi
printf '\n    %sOK: every order was inserted exactly once, although a worker was killed with -9 mid-run.%s\n' "$G" "$N"
OK=1
rm -f -- "$ORDERS"
say "worker logs: $WORKDIR"

# ---------------------------------------------------------------------------
if [ "$STARTED_THROWAWAY" = 1 ] && [ "${TALLY_DEMO_STOP:-0}" = 1 ]; then
    step "Stopping the throwaway cluster (TALLY_DEMO_STOP=1)"
    scripts/pg-up.sh --stop "$PG_DIR" 2>&1 | sed 's/^/    /'
else
    step "Look around"
    say "export DATABASE_URL=$DATABASE_URL"
    say "target/release/coordinator status"
    say "psql \"\$DATABASE_URL\" -c 'select * from demo_orders limit 5'"
    if [ "$STARTED_THROWAWAY" = 1 ]; then
        say "The throwaway cluster is still running. Stop it with:"
        say "scripts/pg-up.sh --stop $PG_DIR"
    fi
fi
