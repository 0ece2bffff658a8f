-- Makes a paused batch claimable again. A batch paused for too many failures continues with
-- its failure limit lifted: the operator has looked. $1 name
update tally.batch
   set state = 'ready', paused_reason = null, max_failed = null, max_failed_ratio = null,
       updated_at = now()
 where name = $1 and state = 'paused'
returning queue
