-- Batches and their per-record outbox rows.
create schema if not exists tally;

create table tally.batch (
    id               bigint generated always as identity primary key,
    name             text not null unique,
    queue            text not null,
    -- preparing: rows being written, invisible to workers; ready: claimable;
    -- paused / cancelled: not claimable. "Finished" is derived from the counts.
    state            text not null default 'preparing'
                     check (state in ('preparing', 'ready', 'paused', 'cancelled')),
    source           text not null,          -- 'file' or 'query'
    id_field         text not null,
    input_digest     text,                   -- sha256 of the input, set when ready
    total            bigint not null default 0,
    max_attempts     int not null check (max_attempts between 1 and 1000),
    backoff_base_ms  bigint not null default 1000 check (backoff_base_ms >= 0),
    backoff_max_ms   bigint not null default 300000 check (backoff_max_ms >= 0),
    -- Tolerated failures: past either limit the batch is paused with a reason, so that a
    -- poisoned batch stops burning work. Null: no limit.
    max_failed       bigint check (max_failed >= 0),
    max_failed_ratio float8 check (max_failed_ratio between 0 and 1),
    paused_reason    text,
    created_at       timestamptz not null default now(),
    ready_at         timestamptz,
    started_at       timestamptz,
    updated_at       timestamptz not null default now()
);
create index batch_queue_ready on tally.batch (queue, id) where state = 'ready';

-- No foreign key to tally.batch: its per-row check would fire once per COPY row of a
-- 10M-record prepare. Records are only written by the store, inside the batch's lifetime.
--
-- Indexes are chosen so that a completion changes no indexed column and is a HOT update
-- (no index writes): `state`, `lease_owner` and `updated_at` appear in no index. A claim
-- changes `available_at` (non-null exactly while pending), so it leaves the claim index.
create table tally.record (
    id               bigint generated always as identity primary key,
    batch_id         bigint not null,
    record_id        text not null,
    state            text not null default 'pending'
                     check (state in ('pending', 'running', 'complete', 'failed', 'cancelled')),
    attempt          int not null default 0,     -- the fencing token of the current claim
    lease_owner      text,                       -- worker holding the row while running
    available_at     timestamptz default now(),  -- claimable from then on; null unless pending
    last_error       text,
    payload          jsonb not null,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    check ((state = 'pending') = (available_at is not null)),
    check (state <> 'failed' or last_error is not null)
) with (fillfactor = 50);
-- Deliberately no unique index on (batch_id, record_id): every claim would insert into it
-- again (random text keys, the costliest index). `prepare` checks uniqueness once per batch
-- instead, in the transaction that loads it.
--
-- The claim reads pending rows of one batch in (available_at, id) order: rows leave this index
-- when claimed, so it stays as small as the remaining work. Because the claim orders by the
-- index's own key, the planner cannot prefer the primary key plus a filter, which on a
-- freshly loaded all-pending batch would rescan every finished row on each claim.
create index record_claim on tally.record (batch_id, available_at, id)
    where available_at is not null;
-- `failed` and `retry-failed` read rows that carry an error: few, unless a batch goes badly.
create index record_errors on tally.record (batch_id, id) where last_error is not null;

-- One row per claim: the lease on the rows it took. Renewing is one small update per claim,
-- not one per record, and the rescuer finds expired claims here without an index on records.
create table tally.lease (
    id          bigint generated always as identity primary key,
    owner       text not null,
    batch_id    bigint not null,
    expires_at  timestamptz not null,
    record_ids  bigint[] not null,
    -- The attempt each row was claimed at: a row claimed again since (under a newer lease)
    -- is not this lease's to rescue.
    attempts    int[] not null
);
create index lease_expiry on tally.lease (expires_at);

-- Exact per-state counts, spread over a few slot rows per batch so that concurrent workers
-- do not serialise on one counter row. Reading a batch's counts sums at most 16 x 5 rows.
create table tally.batch_count (
    batch_id  bigint not null,
    slot      int not null,
    state     text not null,
    n         bigint not null,
    primary key (batch_id, slot, state)
);

-- Every UPDATE or DELETE of records adjusts the counts in the same transaction, so they equal
-- a COUNT(*) by state at every commit. Inserts happen only in `prepare`, which sets the
-- counts itself (a transition table would copy every row of a 10M-row COPY).
create function tally.count_record_changes() returns trigger language plpgsql as $$
begin
    if tg_op = 'UPDATE' then
        insert into tally.batch_count as c (batch_id, slot, state, n)
        select batch_id, pg_backend_pid() % 16, state, sum(d)
          from (select batch_id, state, -1 as d from old_rows
                union all
                select batch_id, state, 1 from new_rows) x
         group by batch_id, state
        having sum(d) <> 0
         order by batch_id, state
        on conflict (batch_id, slot, state) do update set n = c.n + excluded.n;
    elsif tg_op = 'DELETE' then
        insert into tally.batch_count as c (batch_id, slot, state, n)
        select batch_id, pg_backend_pid() % 16, state, -count(*)
          from old_rows
         group by batch_id, state
         order by batch_id, state
        on conflict (batch_id, slot, state) do update set n = c.n + excluded.n;
    end if;
    return null;
end $$;

create trigger record_count_update after update on tally.record
    referencing old table as old_rows new table as new_rows
    for each statement execute function tally.count_record_changes();
create trigger record_count_delete after delete on tally.record
    referencing old table as old_rows
    for each statement execute function tally.count_record_changes();

-- A circuit breaker per queue, shared by the whole fleet. closed: claim freely. open: no
-- worker claims the queue until open_until. half_open: one worker (probe_owner) tries one
-- record; its success closes the breaker, its failure reopens it for twice as long.
create table tally.breaker (
    queue                text primary key,
    state                text not null default 'closed'
                         check (state in ('closed', 'open', 'half_open')),
    consecutive_failures bigint not null default 0,
    cooldown_ms          bigint not null default 0,
    open_until           timestamptz,
    probe_owner          text,
    probe_started_at     timestamptz,
    updated_at           timestamptz not null default now()
);

-- Whether `owner` may claim from `queue` now: 'closed' (claim), 'probe' (claim one record to
-- test the waters; this owner is now the prober) or 'open' (claim nothing). A prober that
-- has not reported within `probe_timeout_ms` is presumed dead and replaced.
create function tally.breaker_gate(p_queue text, p_owner text, p_probe_timeout_ms bigint)
returns text language plpgsql as $$
declare
    b tally.breaker;
begin
    select * into b from tally.breaker where queue = p_queue;
    if not found or b.state = 'closed' then
        return 'closed';
    end if;
    if (b.state = 'open' and b.open_until <= now())
       or (b.state = 'half_open'
           and b.probe_started_at < now() - make_interval(secs => p_probe_timeout_ms / 1000.0)) then
        update tally.breaker
           set state = 'half_open', probe_owner = p_owner, probe_started_at = now(),
               updated_at = now()
         where queue = p_queue and state = b.state
           and coalesce(probe_started_at, 'epoch') = coalesce(b.probe_started_at, 'epoch');
        if found then
            return 'probe';
        end if;
    end if;
    return 'open';
end $$;

-- Records what a worker saw since its last report: `p_successes` completed records and
-- `p_failures` retryable failures (permanent ones say nothing about the downstream). Returns
-- the breaker's state afterwards.
create function tally.breaker_report(
    p_queue text, p_owner text, p_successes bigint, p_failures bigint,
    p_threshold bigint, p_cooldown_ms bigint, p_max_cooldown_ms bigint)
returns text language plpgsql as $$
declare
    b tally.breaker;
begin
    insert into tally.breaker (queue) values (p_queue) on conflict (queue) do nothing;
    select * into b from tally.breaker where queue = p_queue for update;
    if b.state = 'half_open' and b.probe_owner = p_owner then
        if p_successes > 0 then
            update tally.breaker
               set state = 'closed', consecutive_failures = 0, cooldown_ms = 0,
                   open_until = null, probe_owner = null, probe_started_at = null,
                   updated_at = now()
             where queue = p_queue;
            return 'closed';
        elsif p_failures > 0 then
            update tally.breaker
               set state = 'open',
                   cooldown_ms = least(greatest(b.cooldown_ms * 2, p_cooldown_ms), p_max_cooldown_ms),
                   open_until = now() + make_interval(
                       secs => least(greatest(b.cooldown_ms * 2, p_cooldown_ms), p_max_cooldown_ms) / 1000.0),
                   probe_owner = null, probe_started_at = null, updated_at = now()
             where queue = p_queue;
            return 'open';
        end if;
        return b.state;
    end if;
    if b.state <> 'closed' then
        return b.state;
    end if;
    if p_successes > 0 then
        if b.consecutive_failures <> 0 then
            update tally.breaker set consecutive_failures = 0, updated_at = now()
             where queue = p_queue;
        end if;
        return 'closed';
    end if;
    if p_failures = 0 then
        return 'closed';
    end if;
    if b.consecutive_failures + p_failures >= p_threshold then
        update tally.breaker
           set state = 'open', consecutive_failures = b.consecutive_failures + p_failures,
               cooldown_ms = p_cooldown_ms,
               open_until = now() + make_interval(secs => p_cooldown_ms / 1000.0),
               updated_at = now()
         where queue = p_queue;
        return 'open';
    end if;
    update tally.breaker
       set consecutive_failures = b.consecutive_failures + p_failures, updated_at = now()
     where queue = p_queue;
    return 'closed';
end $$;
