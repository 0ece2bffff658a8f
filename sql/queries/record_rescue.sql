-- Returns rows whose lease expired (their worker died or stalled) to pending, or fails them
-- when their attempts are spent. The attempt was counted at claim. $1 limit
with expired as (
    select id
      from tally.record
     where state = 'running' and lease_expires_at < now()
     order by lease_expires_at
     limit $1
       for update skip locked
)
update tally.record r
   set state = case when r.attempt >= b.max_attempts then 'failed' else 'pending' end,
       last_error = 'lease expired on attempt ' || r.attempt || ' of ' || b.max_attempts
                    || ' (worker ' || coalesce(r.lease_owner, '?') || ')',
       available_at = now(),
       lease_owner = null,
       lease_expires_at = null,
       updated_at = now()
  from expired, tally.batch b
 where r.id = expired.id and b.id = r.batch_id
returning b.queue, r.state
