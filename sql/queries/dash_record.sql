-- One record of batch $1 by id $2, with the lease holding it, if any.
select r.id, r.record_id, r.state, r.attempt, r.last_error, jsonb_pretty(r.payload),
       to_char(r.created_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
       to_char(r.updated_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
       to_char(r.available_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
       r.lease_owner, r.lease_id,
       to_char(l.expires_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
  from tally.record r
  left join tally.lease l on l.id = r.lease_id
 where r.batch_id = $1 and r.record_id collate "C" = $2
