-- Position of row $2 within batch $1's load order (ids grow in input order).
select count(*) from tally.record where batch_id = $1 and id <= $2 and available_at is not null
