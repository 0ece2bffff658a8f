-- Stops workers from claiming a batch; rows already running finish. $1 name
update tally.batch set state = 'paused', paused_reason = 'paused by an operator', updated_at = now()
 where name = $1 and state = 'ready'
returning id
