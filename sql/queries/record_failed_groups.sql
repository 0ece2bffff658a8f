-- Failed records of a batch grouped by cause (tally.error_group), largest group first: its
-- key, pattern, size, first and last failure, the first 5 record ids and one full message.
-- Reads the batch's failed records through the record_errors index. $1 batch id, $2 most
-- groups returned.
select left(md5(g), 12) as key,
       g as pattern,
       count(*)::bigint,
       to_char(min(updated_at) at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
       to_char(max(updated_at) at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
       (array_agg(record_id order by id))[1:5],
       min(last_error)
  from (select id, record_id, updated_at, last_error, tally.error_group(last_error) as g
          from tally.record
         where batch_id = $1 and last_error is not null and state = 'failed') f
 group by g
 order by count(*) desc, g
 limit $2
