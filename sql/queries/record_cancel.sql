-- Cancels the rows of batch $1 that are not finished. A worker still running one of them is
-- refused by the fence when it reports, so its outcome is not written.
update tally.record
   set state = 'cancelled', available_at = null, lease_owner = null, lease_id = null,
       updated_at = now()
 where batch_id = $1 and state in ('pending', 'running')
