-- Creates a run, unless one exists for these params (the unique key decides between two
-- starts at once). $1 pipeline, $2 params, $3 run name, $4 version, $5 definition,
-- $6 state ('running', or 'queued' by a backfill), $7 backfill id, $8 and $9 the window it
-- covers (timestamps as text, or null)
insert into tally.pipeline_run (pipeline, params, name, version, definition, state,
                                backfill_id, window_start, window_end, started_at)
values ($1, $2, $3, $4, $5, $6, $7, $8::text::timestamp, $9::text::timestamp,
        case when $6 = 'running' then now() end)
on conflict (pipeline, params) do nothing
returning id
