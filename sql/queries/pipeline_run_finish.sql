-- Ends a run. clock_timestamp(): a backfill compares it with the start of the run after it.
-- $1 run id, $2 'succeeded' or 'failed'
update tally.pipeline_run
   set state = $2, finished_at = clock_timestamp(), updated_at = now()
 where id = $1 and state = 'running'
