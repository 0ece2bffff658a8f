-- Records a failed attempt $3 of delivery ($1 alert, $2 webhook): due again in $4 seconds
-- with error $5, or given up when $6.
update tally.alert_delivery
   set next_at = now() + make_interval(secs => $4::float8),
       last_error = $5,
       state = case when $6 then 'failed' else 'pending' end
 where alert_id = $1 and webhook = $2 and attempts = $3 and state = 'pending'
