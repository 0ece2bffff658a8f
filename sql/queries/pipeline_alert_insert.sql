-- Raises a pipeline alert once, in the transaction that ends the run or fails the stage.
-- $1 key (kind, run id, stage, episode), $2 kind, $3 batch, $4 queue, $5 run, $6 body (JSON)
insert into tally.alert (key, kind, batch, queue, run, body)
values ($1, $2, $3, $4, $5, $6::text::jsonb)
on conflict (key) do nothing
