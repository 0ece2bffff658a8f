-- $1 batch id, $2 reset attempts
update tally.record
   set state = 'pending',
       attempt = case when $2 then 0 else attempt end,
       available_at = now(),
       updated_at = now()
 where batch_id = $1 and last_error is not null and state = 'failed'
