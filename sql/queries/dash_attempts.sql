-- How many records of batch $1 are at each attempt count, and in which state; through the
-- record_lookup index (the caller asks only for batches of bounded size).
select attempt, state, count(*)::bigint
  from tally.record
 where batch_id = $1
 group by attempt, state
 order by attempt, state
