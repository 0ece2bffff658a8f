-- Workers seen in the last $1 seconds, newest first, with the rows under their unexpired
-- leases and their queue's circuit breaker.
select w.id, w.queue, w.handler, w.concurrency,
       to_char(w.started_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
       extract(epoch from now() - w.seen_at)::float8,
       w.stopped_at is not null,
       coalesce((select sum(cardinality(l.record_ids)) from tally.lease l
                  where l.owner = w.id and l.expires_at > now()), 0)::bigint,
       coalesce((select count(*) from tally.lease l
                  where l.owner = w.id and l.expires_at > now()), 0)::bigint,
       coalesce((select k.state from tally.breaker k where k.queue = w.queue), 'closed')
  from tally.worker w
 where w.seen_at > now() - make_interval(secs => $1)
 order by w.queue, w.started_at desc
 limit 500
