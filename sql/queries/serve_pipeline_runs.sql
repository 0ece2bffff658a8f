-- The pipeline runs `serve` reports: queued or running, or finished less than $1 seconds ago,
-- the newest $2 of them (labels stay bounded); each stage with its batch's counts, O(1) per
-- stage from tally.batch_count.
with runs as (
    select id, pipeline, name, state
      from tally.pipeline_run
     where state in ('queued', 'running')
        or finished_at > now() - make_interval(secs => $1::float8)
     order by id desc
     limit $2
)
select r.pipeline, r.name, r.state, s.stage, s.state,
       coalesce(b.total, 0)::bigint,
       c.pending, c.running, c.complete, c.failed, c.cancelled
  from runs r
  join tally.pipeline_stage s on s.run_id = r.id
  left join tally.batch b on b.name = s.batch
  cross join lateral (
      select coalesce(sum(n) filter (where state = 'pending'), 0)::bigint   as pending,
             coalesce(sum(n) filter (where state = 'running'), 0)::bigint   as running,
             coalesce(sum(n) filter (where state = 'complete'), 0)::bigint  as complete,
             coalesce(sum(n) filter (where state = 'failed'), 0)::bigint    as failed,
             coalesce(sum(n) filter (where state = 'cancelled'), 0)::bigint as cancelled
        from tally.batch_count
       where batch_id = b.id) c
 order by r.id, s.position
