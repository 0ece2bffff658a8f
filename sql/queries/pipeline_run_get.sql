-- A run by pipeline and params. Not locked: an advancer finishing the run holds its row and
-- then waits for the pipeline's row, which the caller holds. $1 pipeline, $2 params
select id, name, state, version from tally.pipeline_run where pipeline = $1 and params = $2
