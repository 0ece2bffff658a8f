-- A page of batch $1's records that carry an error, in load order, through record_errors:
-- after row $2 (keyset; 0 for the first page), $3 state or null, $4 error group key or null,
-- $5 least attempt or null, $6 page size.
select id, record_id, state, attempt, last_error,
       to_char(updated_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
  from tally.record
 where batch_id = $1 and last_error is not null and id > $2
   and ($3::text is null or state = $3)
   and ($4::text is null or tally.error_group_key(last_error) = $4)
   and ($5::int is null or attempt >= $5)
 order by id
 limit $6
