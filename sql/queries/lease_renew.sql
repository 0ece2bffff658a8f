-- Extends this owner's leases that are still in force. $1 lease ids, $2 owner, $3 seconds.
-- A lease missing from the result was rescued by another worker: its rows are lost.
update tally.lease
   set expires_at = now() + make_interval(secs => $3)
 where id = any($1) and owner = $2
returning id
