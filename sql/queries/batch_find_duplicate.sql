-- A record id that occurs more than once in the batch being loaded. $1 batch id
select record_id
  from tally.record
 where batch_id = $1
 group by record_id
having count(*) > 1
 limit 1
