-- $1 id, $2 total, $3 input digest
with counts as (
    insert into tally.batch_count (batch_id, slot, state, n)
    values ($1, 0, 'pending', $2)
    on conflict (batch_id, slot, state) do update set n = excluded.n
)
update tally.batch
   set state = 'ready', total = $2, input_digest = $3, ready_at = now(), updated_at = now()
 where id = $1
returning queue
