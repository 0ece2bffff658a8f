-- A page of batch $1's records in record id order, through record_lookup: ids from $2
-- (inclusive) on, after $3 (keyset; '' for the first page), $4 state or null, $5 least
-- attempt or null, $6 page size.
select id, record_id, state, attempt, last_error,
       to_char(updated_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
  from tally.record
 where batch_id = $1
   and record_id collate "C" >= $2
   and record_id collate "C" > $3
   and ($4::text is null or state = $4)
   and ($5::int is null or attempt >= $5)
 order by record_id collate "C"
 limit $6
