-- Removes a batch that is finished or whose prepare was interrupted, after its records (see
-- batch_purge_records), with everything kept for it except its alerts, which are history.
-- The caller holds the batch's prepare lock and its row lock. $1 batch id
with leases as (
    delete from tally.lease where batch_id = $1
), counts as (
    delete from tally.batch_count where batch_id = $1
), progress as (
    delete from tally.batch_progress where batch_id = $1
)
delete from tally.batch where id = $1
