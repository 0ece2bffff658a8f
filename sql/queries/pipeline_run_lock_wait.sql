-- A run to repair, locked (waiting for an advancer that holds it). $1 run id
select definition, name from tally.pipeline_run where id = $1 for update
