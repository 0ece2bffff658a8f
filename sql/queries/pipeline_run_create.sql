-- Creates a run, unless one exists for these params (the unique key decides between two
-- starts at once). $1 pipeline, $2 params, $3 run name, $4 version, $5 definition
insert into tally.pipeline_run (pipeline, params, name, version, definition)
values ($1, $2, $3, $4, $5)
on conflict (pipeline, params) do nothing
returning id
