-- Records outcomes behind the fence: a row is written only while it is still running under
-- this owner and attempt. $1 ids, $2 attempts, $3 new states ('complete' | 'pending' |
-- 'failed'), $4 errors, $5 retry delays in seconds, $6 owner. Returns the rows written.
with v as (
    select * from unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::float8[])
                  as v(id, attempt, state, error, delay_s)
)
update tally.record r
   set state = v.state,
       last_error = v.error,
       available_at = case when v.state = 'pending'
                           then now() + make_interval(secs => v.delay_s) end,
       lease_owner = null,
       updated_at = now()
  from v
 where r.id = v.id and r.attempt = v.attempt and r.lease_owner = $6 and r.state = 'running'
returning r.id
