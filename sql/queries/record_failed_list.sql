-- $1 batch id, $2 limit
select record_id, attempt, coalesce(last_error, ''),
       to_char(updated_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
  from tally.record
 where batch_id = $1 and last_error is not null and state = 'failed'
 order by id
 limit $2
