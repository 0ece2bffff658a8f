-- The input of a stage that handles another stage's failures: the failed records of batch
-- $2 (by name), as they were, into batch $1. Read through the index of rows with an error.
insert into tally.record (batch_id, record_id, payload)
select $1, r.record_id, r.payload
  from tally.record r
 where r.batch_id = (select id from tally.batch where name = $2)
   and r.last_error is not null
   and r.state = 'failed'
