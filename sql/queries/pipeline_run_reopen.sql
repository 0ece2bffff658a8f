-- A run that a repair re-opens: running again until its stages end anew. $1 run id
update tally.pipeline_run
   set state = 'running', finished_at = null, updated_at = now()
 where id = $1
