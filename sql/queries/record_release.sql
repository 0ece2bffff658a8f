-- Gives back claimed rows that were never started, without burning their attempt. The fence
-- is the lease id, which never repeats, so taking the attempt back cannot revive a stale
-- write. $1 ids, $2 lease ids, $3 owner
update tally.record r
   set state = 'pending', attempt = r.attempt - 1, lease_owner = null, lease_id = null,
       available_at = now(), updated_at = now()
  from unnest($1::bigint[], $2::bigint[]) as v(id, lease_id)
 where r.id = v.id and r.lease_id = v.lease_id and r.lease_owner = $3 and r.state = 'running'
returning r.id
