-- A queued run starts (a run to repair keeps `reprocess` until the repair is done).
-- clock_timestamp(), not now(): it must be later than the finish of the run that made room
-- for it, which committed during this transaction. $1 run id
update tally.pipeline_run
   set state = 'running', started_at = clock_timestamp(), updated_at = now()
 where id = $1 and state = 'queued'
