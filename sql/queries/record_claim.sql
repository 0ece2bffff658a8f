-- Claims up to $2 pending rows of batch $1 for owner $3 with a lease of $4 seconds.
-- The attempt is bumped in the same statement: it is the fencing token every later write checks.
with picked as (
    select id
      from tally.record
     where batch_id = $1 and state = 'pending' and available_at <= now()
     order by id
     limit $2
       for update skip locked
)
update tally.record r
   set state = 'running',
       attempt = r.attempt + 1,
       lease_owner = $3,
       lease_expires_at = now() + make_interval(secs => $4),
       updated_at = now()
  from picked
 where r.id = picked.id
returning r.id, r.record_id, r.attempt, r.payload
