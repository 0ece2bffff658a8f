-- `serve` compares a finished batch's failed count as well as complete + failed: a batch
-- that finished with failures and, after retry-failed, finished again within one check
-- interval has the same `done` as before, yet finished anew and is a new alert.
alter table tally.batch_progress add column failed bigint not null default 0;

-- Existing rows get the current count, so that applying this migration raises nothing.
update tally.batch_progress p
   set failed = c.failed
  from (select batch_id, coalesce(sum(n) filter (where state = 'failed'), 0) as failed
          from tally.batch_count
         group by batch_id) c
 where c.batch_id = p.batch_id;
