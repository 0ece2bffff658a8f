-- A record id that occurs more than once in the batch being loaded, with the row of its
-- second occurrence. $1 batch id
select record_id, (array_agg(id order by id))[2]
  from tally.record
 where batch_id = $1
 group by record_id
having count(*) > 1
 order by 2
 limit 1
