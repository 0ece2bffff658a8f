-- Raises an alert once: $1 key (kind, batch or queue, episode), $2 kind, $3 batch, $4 queue,
-- $5 the webhook body (JSON text). Returns its id, or nothing if it was already raised.
insert into tally.alert (key, kind, batch, queue, body)
values ($1, $2, $3, $4, $5::text::jsonb)
on conflict (key) do nothing
returning id
