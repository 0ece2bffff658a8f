-- Moves a stage on. $1 run id, $2 stage, $3 state, $4 reason
update tally.pipeline_stage
   set state = $3,
       reason = $4,
       started_at = case when $3 in ('preparing', 'running') then coalesce(started_at, now())
                         else started_at end,
       finished_at = case when $3 in ('succeeded', 'failed', 'skipped', 'upstream_failed')
                          then now() end,
       updated_at = now()
 where run_id = $1 and stage = $2
