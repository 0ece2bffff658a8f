-- A stage whose batch was prepared, if nobody moved it meanwhile. $1 run id, $2 stage,
-- $3 new state ('running', or 'succeeded' with nothing to do), $4 reason
update tally.pipeline_stage
   set state = $3, reason = $4, updated_at = now(),
       finished_at = case when $3 = 'succeeded' then now() end
 where run_id = $1 and stage = $2 and state = 'preparing'
