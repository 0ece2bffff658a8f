-- The row of the second occurrence of id $2 in batch $1 (ids grow in input order).
select id from tally.record where batch_id = $1 and record_id = $2 order by id offset 1 limit 1
