-- The dashboard's batches, newest first, one page: $1 queue, $2 part of the name, $3 state as
-- `status` shows it (all three null for any), $4 only batches with a smaller id (keyset
-- paging; null for the first page), $5 page size. The counts of each batch are summed from at
-- most 16 x 5 rows, batch by batch, until the page is full.
select b.name, b.queue, b.state, b.total,
       c.pending, c.running, c.complete, c.failed, c.cancelled,
       extract(epoch from now() - b.started_at)::float8 as elapsed_s,
       b.max_attempts,
       to_char(b.created_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') as created_at,
       b.paused_reason,
       (select k.state || coalesce(' until ' || to_char(k.open_until at time zone 'UTC',
                                       'YYYY-MM-DD"T"HH24:MI:SS"Z"'), '')
          from tally.breaker k where k.queue = b.queue and k.state <> 'closed') as breaker,
       -- As in batch_status: preparing, yet no session holds its prepare lock.
       b.state = 'preparing' and not exists (
           select from pg_locks l
            where l.locktype = 'advisory' and l.granted
              and l.database = (select oid from pg_database where datname = current_database())
              and l.classid = 7236552 and l.objid = hashtext(b.name)::oid and l.objsubid = 2
       ) as interrupted,
       b.id,
       extract(epoch from now() - b.created_at)::float8 as age_s
  from tally.batch b
 cross join lateral (
       select coalesce(sum(n) filter (where state = 'pending'), 0)::bigint   as pending,
              coalesce(sum(n) filter (where state = 'running'), 0)::bigint   as running,
              coalesce(sum(n) filter (where state = 'complete'), 0)::bigint  as complete,
              coalesce(sum(n) filter (where state = 'failed'), 0)::bigint    as failed,
              coalesce(sum(n) filter (where state = 'cancelled'), 0)::bigint as cancelled
         from tally.batch_count where batch_id = b.id) c
 where ($1::text is null or b.queue = $1)
   and ($2::text is null or strpos(b.name, $2) > 0)
   and ($4::bigint is null or b.id < $4)
   and ($3::text is null or $3 = case
         when b.state = 'ready' and c.pending + c.running = 0 and c.failed > 0
             then 'complete_with_failures'
         when b.state = 'ready' and c.pending + c.running = 0 then 'complete'
         when b.state = 'ready' and b.started_at is not null then 'running'
         else b.state end)
 order by b.id desc
 limit $5
