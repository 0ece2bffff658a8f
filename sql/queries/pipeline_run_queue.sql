-- An ended run (still ended: a repair may have re-opened it since) that a backfill will start
-- again (repairing it when $3 is 'repair').
-- $1 run id, $2 backfill id, $3 reprocess
update tally.pipeline_run
   set state = 'queued', backfill_id = $2, reprocess = $3, updated_at = now()
 where id = $1 and state in ('succeeded', 'failed')
