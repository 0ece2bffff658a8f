-- What `serve` compares with its last observation: every batch that is not preparing and is
-- unfinished, finished less than $1 seconds ago, or given pending work again since; with its
-- counts (O(1), from tally.batch_count) and its row in tally.batch_progress (null if new).
select b.id, b.name, b.queue, b.state, b.paused_reason, b.total,
       c.pending, c.running, c.complete, c.failed, c.cancelled,
       p.batch_id is not null as seen,
       coalesce(p.done, 0), coalesce(p.finished, false), coalesce(p.finish_episode, 0),
       coalesce(p.stalled, false), coalesce(p.stall_episode, 0),
       coalesce(p.limit_paused, false), coalesce(p.limit_episode, 0),
       coalesce(extract(epoch from now() - p.changed_at), 0)::float8 as unchanged_s,
       coalesce(p.failed, 0),
       -- The batch's last own change (ready, started, paused, resumed) is older than the
       -- retention: if it is first seen already finished, it finished long ago.
       greatest(b.updated_at, b.ready_at, b.started_at)
           < now() - make_interval(secs => $1::float8) as quiet_long
  from tally.batch b
  left join tally.batch_progress p on p.batch_id = b.id
  cross join lateral (
      select coalesce(sum(n) filter (where state = 'pending'), 0)::bigint   as pending,
             coalesce(sum(n) filter (where state = 'running'), 0)::bigint   as running,
             coalesce(sum(n) filter (where state = 'complete'), 0)::bigint  as complete,
             coalesce(sum(n) filter (where state = 'failed'), 0)::bigint    as failed,
             coalesce(sum(n) filter (where state = 'cancelled'), 0)::bigint as cancelled
        from tally.batch_count
       where batch_id = b.id) c
 where b.state <> 'preparing'
   and (p.finished_at is null
        or p.finished_at > now() - make_interval(secs => $1::float8)
        -- Finished long ago: watched again only once given pending work (retry-failed). The
        -- first entry of the claim index, in its own order so that no plan scans the table.
        or (select r.available_at
              from tally.record r
             where r.batch_id = b.id and r.available_at is not null
             order by r.available_at
             limit 1) is not null)
 order by b.id
