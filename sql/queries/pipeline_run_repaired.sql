-- A repair that a backfill asked for is done (also when it found nothing to re-open).
-- $1 run id
update tally.pipeline_run set reprocess = null where id = $1 and reprocess is not null
