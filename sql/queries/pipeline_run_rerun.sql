-- A run that ended, started again from scratch: a new attempt, whose stages get new batches, under the
-- pipeline's current version. $1 run id, $2 state ('running', or 'queued' by a backfill),
-- $3 version, $4 definition, $5 backfill id (or null)
update tally.pipeline_run
   set state = $2, attempt = attempt + 1, episode = episode + 1, version = $3,
       definition = $4, backfill_id = coalesce($5, backfill_id), reprocess = null,
       finished_at = null, updated_at = now(),
       started_at = case when $2 = 'running' then now() else started_at end
 where id = $1 and state in ('succeeded', 'failed')
returning attempt
