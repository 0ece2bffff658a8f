-- The latest $2 backfills of pipeline $1 (every pipeline when null), newest first, with how
-- many of their runs are in each state.
select f.id, f.pipeline, f.range_from, f.range_to, f.step, f.max_active, f.reprocess,
       f.runs, f.skipped, f.state,
       to_char(f.created_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
       to_char(f.finished_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
       (select count(*) from tally.pipeline_run r
         where r.backfill_id = f.id and r.state = 'succeeded')::bigint,
       (select count(*) from tally.pipeline_run r
         where r.backfill_id = f.id and r.state = 'failed')::bigint
  from tally.pipeline_backfill f
 where $1::text is null or f.pipeline = $1
 order by f.id desc
 limit $2
