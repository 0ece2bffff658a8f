-- A run by name. $1 name
select id, pipeline, params, state, version, created_at::text, finished_at::text
  from tally.pipeline_run
 where name = $1
