-- Pipelines: runs of stages, each stage an ordinary batch (see docs/pipelines.md).

-- The latest definition of each pipeline. A changed file under the same name is refused
-- unless started with --new-version, which bumps `version`.
create table tally.pipeline (
    name        text primary key,
    version     int not null default 1,
    digest      text not null,
    definition  jsonb not null,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now()
);

-- One run per (pipeline, params), enforced here: two `pipeline run` started at once make one.
create table tally.pipeline_run (
    id          bigint generated always as identity primary key,
    pipeline    text not null references tally.pipeline (name),
    params      jsonb not null,
    name        text not null unique,
    version     int not null,
    -- The definition the run was started with: a later version does not change it.
    definition  jsonb not null,
    state       text not null default 'running'
                check (state in ('running', 'succeeded', 'failed')),
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    finished_at timestamptz,
    unique (pipeline, params)
);
-- What advancers scan: only unfinished runs.
create index pipeline_run_running on tally.pipeline_run (id) where state = 'running';

create table tally.pipeline_stage (
    run_id      bigint not null references tally.pipeline_run (id) on delete cascade,
    stage       text not null,
    position    int not null,
    batch       text not null unique,
    depends_on  text[] not null,
    state       text not null default 'waiting'
                check (state in ('waiting', 'preparing', 'running', 'succeeded', 'failed',
                                 'skipped', 'upstream_failed')),
    -- Why it failed (when not its records), or why it had nothing to do.
    reason      text,
    started_at  timestamptz,
    finished_at timestamptz,
    updated_at  timestamptz not null default now(),
    primary key (run_id, stage)
);
