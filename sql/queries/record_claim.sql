-- Claims up to $2 due rows of batch $1 for owner $3, leased for $4 seconds. The attempt is
-- bumped in the same statement: it is the fencing token every later write checks. Returns
-- the rows and the id of their lease.
with picked as (
    select id
      from tally.record
     where batch_id = $1 and available_at <= now()
     order by available_at, id
     limit $2
       for update skip locked
),
claimed as (
    update tally.record r
       set state = 'running',
           attempt = r.attempt + 1,
           lease_owner = $3,
           available_at = null,
           updated_at = now()
      from picked
     where r.id = picked.id
    returning r.id, r.record_id, r.attempt, r.payload
),
lease as (
    insert into tally.lease (owner, batch_id, expires_at, record_ids, attempts)
    select $3, $1, now() + make_interval(secs => $4), array_agg(id), array_agg(attempt)
      from claimed
    having count(*) > 0
    returning id
)
select c.id, c.record_id, c.attempt, c.payload, (select id from lease)
  from claimed c
