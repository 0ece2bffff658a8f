-- Records outcomes behind the fence: a row is written only while it is still running under
-- the same lease. $1 ids, $2 lease ids, $3 new states ('complete' | 'pending' | 'failed'),
-- $4 errors, $5 retry delays in seconds, $6 owner. Returns the rows written.
with v as (
    select * from unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::float8[])
                  as v(id, lease_id, state, error, delay_s)
)
update tally.record r
   set state = v.state,
       last_error = v.error,
       available_at = case when v.state = 'pending'
                           then now() + make_interval(secs => v.delay_s) end,
       lease_owner = null,
       lease_id = null,
       updated_at = now()
  from v
 where r.id = v.id and r.lease_id = v.lease_id and r.lease_owner = $6 and r.state = 'running'
returning r.id
