-- How many failed records of batch $1 are in error group $2 (a key of record_failed_groups):
-- what `retry-failed --group` would send back. Through the record_errors index.
select count(*)::bigint
  from tally.record
 where batch_id = $1 and last_error is not null and state = 'failed'
   and tally.error_group_key(last_error) = $2
