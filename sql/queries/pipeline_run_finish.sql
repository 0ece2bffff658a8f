-- Ends a run. $1 run id, $2 'succeeded' or 'failed'
update tally.pipeline_run
   set state = $2, finished_at = now(), updated_at = now()
 where id = $1 and state = 'running'
