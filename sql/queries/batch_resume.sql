-- Makes a paused batch claimable again. $1 name
update tally.batch set state = 'ready', updated_at = now()
 where name = $1 and state = 'paused'
returning queue
