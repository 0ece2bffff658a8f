-- Locks the rows this owner still holds, so a handler's effects commit only with them.
-- $1 ids, $2 lease ids, $3 owner
select r.id
  from tally.record r
  join unnest($1::bigint[], $2::bigint[]) as v(id, lease_id)
    on r.id = v.id and r.lease_id = v.lease_id
 where r.lease_owner = $3 and r.state = 'running'
 order by r.id
   for update of r
