-- The dashboard of `coordinator serve` (see docs/dashboard.md): finding a record by id,
-- throughput over time, the workers seen, and an audit of every action taken from it.

-- Record search by id, exact or prefix, and keyset paging through a batch in id order. "C"
-- ordering makes a prefix a plain range. record_id never changes after prepare, so claims and
-- completions stay HOT updates; prepare writes one more index entry per record.
create index record_lookup on tally.record (batch_id, record_id collate "C");

-- What an observation pass of `serve` saw of each unfinished batch, for the throughput chart.
-- Kept two days (the pass deletes older ones).
create table tally.batch_sample (
    batch_id  bigint not null,
    at        timestamptz not null default now(),
    done      bigint not null,
    failed    bigint not null,
    primary key (batch_id, at)
);
create index batch_sample_at on tally.batch_sample (at);

-- One row per worker process, written by the worker every rescue interval: what the
-- dashboard's workers page lists. Rows of workers gone for a day are deleted by serve.
create table tally.worker (
    id          text primary key,
    queue       text not null,
    handler     text not null,
    concurrency int not null,
    started_at  timestamptz not null default now(),
    seen_at     timestamptz not null default now(),
    stopped_at  timestamptz
);

-- Every action taken from the dashboard: who, what, on what, when, and how many rows.
create table tally.audit (
    id        bigint generated always as identity primary key,
    at        timestamptz not null default now(),
    actor     text not null,
    action    text not null,
    batch     text,
    run       text,
    detail    text,
    rows      bigint not null
);
create index audit_batch on tally.audit (batch, id) where batch is not null;
create index audit_run on tally.audit (run, id) where run is not null;
