-- A run that a repair re-opens: running again until its stages end anew, in a new episode
-- of alerts. $1 run id
update tally.pipeline_run
   set state = 'running', finished_at = null, updated_at = now(), started_at = clock_timestamp(),
       episode = episode + 1, reprocess = null
 where id = $1
