-- Claims up to $2 due rows of batch $1 for owner $3, leased for $4 seconds, while the batch
-- is still ready (a pause or cancel that committed before this statement stops it). The rows
-- carry the new lease's id: the fencing token every later write checks. The attempt is
-- bumped here; the rescue takes it back for rows whose handler never started (see
-- lease_start.sql). Returns the rows, by id (the order of the lease's `record_ids`).
with lease_id as (
    select nextval('tally.lease_id_seq') as id
),
picked as (
    select r.id
      from tally.record r
     where r.batch_id = $1 and r.available_at <= now()
       and exists (select 1 from tally.batch b where b.id = $1 and b.state = 'ready')
     order by r.available_at, r.id
     limit $2
       for update of r skip locked
),
claimed as (
    update tally.record r
       set state = 'running',
           attempt = r.attempt + 1,
           lease_owner = $3,
           lease_id = (select id from lease_id),
           available_at = null,
           updated_at = now()
      from picked
     where r.id = picked.id
    returning r.id, r.record_id, r.attempt, r.payload
),
lease as (
    insert into tally.lease (id, owner, batch_id, expires_at, record_ids, attempts, started)
    overriding system value
    select (select id from lease_id), $3, $1, now() + make_interval(secs => $4),
           array_agg(id order by id), array_agg(attempt order by id), 0
      from claimed
    having count(*) > 0
    returning id
)
select c.id, c.record_id, c.attempt, c.payload, (select id from lease)
  from claimed c
 order by c.id
