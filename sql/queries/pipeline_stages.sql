-- A run's stages with their batches' state and counts (none yet for a stage not prepared).
-- $1 run id
select s.stage, s.state, s.batch, s.depends_on, s.reason,
       b.state as batch_state, b.paused_reason,
       coalesce(b.total, 0),
       coalesce(sum(c.n) filter (where c.state = 'pending'), 0)::bigint,
       coalesce(sum(c.n) filter (where c.state = 'running'), 0)::bigint,
       coalesce(sum(c.n) filter (where c.state = 'complete'), 0)::bigint,
       coalesce(sum(c.n) filter (where c.state = 'failed'), 0)::bigint,
       coalesce(sum(c.n) filter (where c.state = 'cancelled'), 0)::bigint,
       b.id is not null as has_batch
  from tally.pipeline_stage s
  left join tally.batch b on b.name = s.batch
  left join tally.batch_count c on c.batch_id = b.id
 where s.run_id = $1
 group by s.stage, s.state, s.batch, s.depends_on, s.reason, s.position, b.id
 order by s.position
