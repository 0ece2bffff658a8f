-- Closes a queue's breaker by hand. $1 queue
update tally.breaker
   set state = 'closed', consecutive_failures = 0, cooldown_ms = 0, open_until = null,
       probe_owner = null, probe_started_at = null, updated_at = now()
 where queue = $1 and state <> 'closed'
returning queue
