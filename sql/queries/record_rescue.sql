-- Takes up to $1 expired leases (their worker died or stalled) and returns their rows that
-- are still running under that lease (same owner and attempt) to pending, or fails them when their attempts
-- are spent. The attempt was counted at claim. Safe from several workers at once: each
-- lease is taken by one of them.
with expired as (
    delete from tally.lease
     where id in (select id from tally.lease
                   where expires_at < now()
                   order by expires_at
                   limit $1
                     for update skip locked)
    returning owner, record_ids, attempts
),
held as (
    select e.owner, h.id, h.attempt
      from expired e, unnest(e.record_ids, e.attempts) as h(id, attempt)
)
update tally.record r
   set state = case when r.attempt >= b.max_attempts then 'failed' else 'pending' end,
       available_at = case when r.attempt >= b.max_attempts then null else now() end,
       last_error = 'lease expired on attempt ' || r.attempt || ' of ' || b.max_attempts
                    || ' (worker ' || h.owner || ')',
       lease_owner = null,
       updated_at = now()
  from held h, tally.batch b
 where r.id = h.id and r.attempt = h.attempt and r.lease_owner = h.owner and r.state = 'running'
   and b.id = r.batch_id
returning b.queue, r.state, r.batch_id
