-- A backfill to move on, unless another process is doing it right now. $1 backfill id
select state, max_active from tally.pipeline_backfill where id = $1 for update skip locked
