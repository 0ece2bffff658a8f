-- A worker's row on the dashboard: $1 id, $2 queue, $3 handler, $4 concurrency, $5 stopping.
insert into tally.worker as w (id, queue, handler, concurrency, stopped_at)
values ($1, $2, $3, $4, case when $5 then now() end)
on conflict (id) do update
   set seen_at = now(),
       stopped_at = case when $5 then now() end
