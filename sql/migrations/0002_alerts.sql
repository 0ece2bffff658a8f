-- What `coordinator serve` watches, shared by all its replicas so that they agree on when a
-- batch last made progress, when it finished, and which alerts were already raised.

-- One row per batch. `done` is complete + failed as last seen; `changed_at` is when it last
-- changed (or when the batch last stopped being paused), the clock of stall detection. Each
-- kind of event has an episode number that goes into its alert key, so that an event
-- repeated later (finished again after retry-failed, stalled again) is a new alert.
create table tally.batch_progress (
    batch_id        bigint primary key,
    done            bigint not null default 0,
    changed_at      timestamptz not null default now(),
    finished        boolean not null default false,
    finished_at     timestamptz,
    finish_episode  int not null default 0,
    stalled         boolean not null default false,
    stall_episode   int not null default 0,
    limit_paused    boolean not null default false,
    limit_episode   int not null default 0
);

-- Batches that exist before alerts do are taken as seen: starting `serve` on an old database
-- must not announce every batch that finished long ago.
insert into tally.batch_progress (batch_id, done, finished, finished_at)
select b.id,
       coalesce(sum(c.n) filter (where c.state in ('complete', 'failed')), 0),
       b.state <> 'preparing'
           and coalesce(sum(c.n) filter (where c.state in ('pending', 'running')), 0) = 0,
       case when b.state <> 'preparing'
                 and coalesce(sum(c.n) filter (where c.state in ('pending', 'running')), 0) = 0
            then now() end
  from tally.batch b
  left join tally.batch_count c on c.batch_id = b.id
 group by b.id;

-- One row per queue whose circuit breaker was seen: whether it is open, and its episode.
create table tally.queue_progress (
    queue            text primary key,
    breaker_open     boolean not null default false,
    breaker_episode  int not null default 0
);

-- One row per event. `key` (kind, batch or queue, episode) is unique: however many replicas
-- notice an event, it is recorded once. `body` is the webhook's JSON, built when raised.
create table tally.alert (
    id          bigint generated always as identity primary key,
    key         text not null unique,
    kind        text not null check (kind in ('finished', 'finished_with_failures',
                                              'failure_limit', 'breaker_open', 'stalled')),
    batch       text,
    queue       text not null,
    body        jsonb not null,
    created_at  timestamptz not null default now()
);
create index alert_created on tally.alert (created_at);

-- One row per alert and webhook. The webhook is named by the sha256 of its URL: URLs carry
-- secrets (a Slack webhook's path is its password) and stay in the replicas' configuration.
-- A replica claims a due row (next_at <= now()) with FOR UPDATE SKIP LOCKED and pushes
-- next_at one lease ahead, so that a replica killed mid-delivery leaves the row due again
-- once the lease passes; `attempts` is the fencing token of the claim.
create table tally.alert_delivery (
    alert_id    bigint not null,
    webhook     text not null,
    state       text not null default 'pending' check (state in ('pending', 'sent', 'failed')),
    attempts    int not null default 0,
    next_at     timestamptz not null default now(),
    last_error  text,
    sent_at     timestamptz,
    primary key (alert_id, webhook)
);
create index alert_delivery_due on tally.alert_delivery (next_at) where state = 'pending';
