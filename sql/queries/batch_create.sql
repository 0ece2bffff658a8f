-- $1 name, $2 queue, $3 source, $4 id_field, $5 max_attempts, $6 backoff_base_ms,
-- $7 backoff_max_ms, $8 max_failed, $9 max_failed_ratio
insert into tally.batch (name, queue, source, id_field, max_attempts, backoff_base_ms,
                         backoff_max_ms, max_failed, max_failed_ratio)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
on conflict (name) do nothing
returning id
