-- Marks a batch cancelled so no worker claims it again. $1 name
update tally.batch set state = 'cancelled', updated_at = now()
 where name = $1 and state in ('ready', 'paused')
returning id
