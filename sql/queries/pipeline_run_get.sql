-- A run by pipeline and params, locked until the caller commits. $1 pipeline, $2 params
select id, name, state, version from tally.pipeline_run where pipeline = $1 and params = $2
   for update
