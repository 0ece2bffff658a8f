-- A page of batch $1's records in record id order, through record_lookup: ids from $2
-- (inclusive) below $3, after $4 (keyset; '' for the first page), $5 state or null, $6 least
-- attempt or null, $7 page size.
select id, record_id, state, attempt, last_error,
       to_char(updated_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
  from tally.record
 where batch_id = $1
   and record_id collate "C" >= $2 and record_id collate "C" < $3
   and record_id collate "C" > $4
   and ($5::text is null or state = $5)
   and ($6::int is null or attempt >= $6)
 order by record_id collate "C"
 limit $7
