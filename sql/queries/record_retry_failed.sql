-- Failed records back to pending: all of them, or those of one cause ($3, an error group
-- key; null for all). $1 batch id, $2 reset attempts
update tally.record
   set state = 'pending',
       attempt = case when $2 then 0 else attempt end,
       available_at = now(),
       updated_at = now()
 where batch_id = $1 and last_error is not null and state = 'failed'
   and ($3::text is null or tally.error_group_key(last_error) = $3::text)
