-- First step of a purge (see batch_purge): the batch's records, reporting how many were still
-- pending or running, so that the caller rolls back then (retry-failed may have committed
-- since its check). Its own statement, since the count trigger runs at its end. $1 batch id
with records as (
    delete from tally.record where batch_id = $1 returning state
)
select count(*)::bigint,
       count(*) filter (where state in ('pending', 'running'))::bigint
  from records
