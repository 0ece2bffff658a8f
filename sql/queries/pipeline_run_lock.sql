-- A run to advance, unless another process is advancing it right now. $1 run id
select name, state, definition, params, pipeline, episode, reprocess
  from tally.pipeline_run
 where id = $1
   for update skip locked
