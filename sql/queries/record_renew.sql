-- Extends the leases this owner still holds. $1 ids, $2 attempts, $3 owner, $4 lease seconds
update tally.record r
   set lease_expires_at = now() + make_interval(secs => $4)
  from unnest($1::bigint[], $2::int[]) as v(id, attempt)
 where r.id = v.id and r.attempt = v.attempt and r.lease_owner = $3 and r.state = 'running'
returning r.id
