-- The queued runs of a backfill to start now, earliest window first. $1 backfill id, $2 room
select id, reprocess
  from tally.pipeline_run
 where backfill_id = $1 and state = 'queued'
 order by window_start nulls last, id
 limit $2
