-- Takes up to $1 expired leases (their worker died or stalled) and returns their rows that
-- are still running under that lease. A row whose handler started (within the lease's
-- announced `started` prefix) has spent its attempt: it goes back to pending, or fails when
-- its attempts are spent. A row that never started gets its attempt back and goes back to
-- pending with its last error unchanged. Safe from several workers at once: each lease is
-- taken by one of them. Rows of leases from before lease ids were the fence match on owner
-- and attempt, and count as started.
with expired as (
    delete from tally.lease
     where id in (select id from tally.lease
                   where expires_at < now()
                   order by expires_at
                   limit $1
                     for update skip locked)
    returning id, owner, record_ids, attempts, started
),
held as (
    select e.id as lease_id, e.owner, h.id, h.attempt,
           (e.started is null or h.pos <= e.started) as ran
      from expired e,
           unnest(e.record_ids, e.attempts) with ordinality as h(id, attempt, pos)
),
returned as (
    update tally.record r
       set state = case when h.ran and r.attempt >= b.max_attempts then 'failed'
                        else 'pending' end,
           attempt = case when h.ran then r.attempt else r.attempt - 1 end,
           available_at = case when h.ran and r.attempt >= b.max_attempts then null
                               else now() end,
           last_error = case when h.ran
                             then 'lease expired on attempt ' || r.attempt || ' of '
                                  || b.max_attempts || ' (worker ' || h.owner || ')'
                             else r.last_error end,
           lease_owner = null,
           lease_id = null,
           updated_at = now()
      from held h, tally.batch b
     where r.id = h.id and r.state = 'running' and b.id = r.batch_id
       and (r.lease_id = h.lease_id
            or (r.lease_id is null and r.attempt = h.attempt and r.lease_owner = h.owner))
    returning b.queue, r.state, r.batch_id, h.ran
)
select queue, state, batch_id, ran from returned
