-- Gives back claimed rows that were never started, without burning their attempt.
-- $1 ids, $2 attempts, $3 owner
update tally.record r
   set state = 'pending', attempt = r.attempt - 1, lease_owner = null, available_at = now(),
       updated_at = now()
  from unnest($1::bigint[], $2::int[]) as v(id, attempt)
 where r.id = v.id and r.attempt = v.attempt and r.lease_owner = $3 and r.state = 'running'
returning r.id
