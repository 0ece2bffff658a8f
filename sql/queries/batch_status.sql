-- $1 name, or null for every batch
select b.name, b.queue, b.state, b.total,
       coalesce(sum(c.n) filter (where c.state = 'pending'), 0)::bigint   as pending,
       coalesce(sum(c.n) filter (where c.state = 'running'), 0)::bigint   as running,
       coalesce(sum(c.n) filter (where c.state = 'complete'), 0)::bigint  as complete,
       coalesce(sum(c.n) filter (where c.state = 'failed'), 0)::bigint    as failed,
       coalesce(sum(c.n) filter (where c.state = 'cancelled'), 0)::bigint as cancelled,
       extract(epoch from now() - b.started_at)::float8                    as elapsed_s,
       b.max_attempts,
       to_char(b.created_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') as created_at,
       b.paused_reason,
       (select k.state || coalesce(' until ' || to_char(k.open_until at time zone 'UTC',
                                       'YYYY-MM-DD"T"HH24:MI:SS"Z"'), '')
          from tally.breaker k where k.queue = b.queue and k.state <> 'closed') as breaker,
       -- Preparing, yet no session holds its prepare lock (see prepare_lock): the prepare
       -- died before its load committed.
       b.state = 'preparing' and not exists (
           select from pg_locks l
            where l.locktype = 'advisory' and l.granted
              and l.database = (select oid from pg_database where datname = current_database())
              and l.classid = 7236552 and l.objid = hashtext(b.name)::oid and l.objsubid = 2
       ) as interrupted
  from tally.batch b
  left join tally.batch_count c on c.batch_id = b.id
 where $1::text is null or b.name = $1
 group by b.id
 order by b.id
