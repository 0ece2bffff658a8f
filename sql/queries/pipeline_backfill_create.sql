-- Records a backfill. $1 pipeline, $2 from, $3 to, $4 step, $5 max active, $6 reprocess,
-- $7 runs it queued, $8 windows it skipped
insert into tally.pipeline_backfill (pipeline, range_from, range_to, step, max_active,
                                     reprocess, runs, skipped, state, finished_at)
values ($1, $2, $3, $4, $5, $6, $7, $8,
        case when $7 = 0 then 'succeeded' else 'running' end,
        case when $7 = 0 then now() end)
returning id
