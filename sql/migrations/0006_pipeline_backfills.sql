-- Backfills, watermarks, reprocessing and pipeline alerts (see docs/pipelines.md).

-- A run of a backfill waits `queued` until the backfill has room for it.
alter table tally.pipeline_run drop constraint pipeline_run_state_check;
alter table tally.pipeline_run add constraint pipeline_run_state_check
    check (state in ('queued', 'running', 'succeeded', 'failed'));

alter table tally.pipeline_run
    -- The backfill that queued it last, if any.
    add column backfill_id  bigint,
    -- 'repair' when the backfill that queued it repairs its failed records on starting it.
    add column reprocess    text check (reprocess = 'repair'),
    -- The span of time the run covers, [start, end), from its date or window params: what
    -- watermarks follow. Null for a run whose params are no window.
    add column window_start timestamp,
    add column window_end   timestamp,
    -- When it last became running: with finished_at, how many ran at once.
    add column started_at   timestamptz,
    -- Bumped by every repair and rerun: the episode of its alerts.
    add column episode      int not null default 1,
    -- Bumped by every rerun: its stages' batches are new ones.
    add column attempt      int not null default 1;
update tally.pipeline_run set started_at = created_at;

create index pipeline_run_queued on tally.pipeline_run (backfill_id, window_start, id)
    where state = 'queued';
create index pipeline_run_backfill on tally.pipeline_run (backfill_id) where backfill_id is not null;
create index pipeline_run_window on tally.pipeline_run (pipeline, window_start)
    where window_start is not null;
-- What serve's /metrics reads: unfinished runs and those finished recently.
create index pipeline_run_finished on tally.pipeline_run (finished_at);

-- The end of the latest window up to which every run of the pipeline succeeded. Advanced in
-- the transaction that finishes a run.
alter table tally.pipeline add column watermark timestamp;

-- One row per `pipeline backfill`: its range and settings, and how it ended.
create table tally.pipeline_backfill (
    id          bigint generated always as identity primary key,
    pipeline    text not null references tally.pipeline (name),
    range_from  text not null,
    range_to    text not null,
    step        text not null,
    max_active  int not null check (max_active >= 1),
    reprocess   text not null check (reprocess in ('none', 'failed', 'all')),
    runs        int not null,
    skipped     int not null,
    state       text not null default 'running'
                check (state in ('running', 'succeeded', 'failed')),
    created_at  timestamptz not null default now(),
    finished_at timestamptz
);
create index pipeline_backfill_running on tally.pipeline_backfill (id) where state = 'running';

-- Pipeline alerts, raised in the transaction that ends the run or fails the stage.
alter table tally.alert drop constraint alert_kind_check;
alter table tally.alert add constraint alert_kind_check
    check (kind in ('finished', 'finished_with_failures', 'failure_limit', 'breaker_open',
                    'stalled', 'pipeline_finished', 'pipeline_failed', 'stage_failed'));
alter table tally.alert alter column queue drop not null;
alter table tally.alert add column run text;
