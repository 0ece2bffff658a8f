-- A backfill's state and its runs by state. $1 backfill id
select b.state, b.max_active,
       count(r.id) filter (where r.state = 'queued')::bigint,
       count(r.id) filter (where r.state = 'running')::bigint,
       count(r.id) filter (where r.state = 'succeeded')::bigint,
       count(r.id) filter (where r.state = 'failed')::bigint
  from tally.pipeline_backfill b
  left join tally.pipeline_run r on r.backfill_id = b.id
 where b.id = $1
 group by b.id
