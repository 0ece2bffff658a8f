-- Ready batches of a queue that still have pending rows, oldest first. $1 queue
select b.id, b.name, b.max_attempts, b.backoff_base_ms, b.backoff_max_ms
  from tally.batch b
 where b.queue = $1 and b.state = 'ready'
   and (select coalesce(sum(c.n), 0) from tally.batch_count c
         where c.batch_id = b.id and c.state = 'pending') > 0
 order by b.id
