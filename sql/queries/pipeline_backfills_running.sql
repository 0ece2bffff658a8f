-- Backfills still starting runs, oldest first. $1 limit
select id from tally.pipeline_backfill where state = 'running' order by id limit $1
