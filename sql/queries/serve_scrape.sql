-- Progress of every batch `serve` reports: unfinished, finished less than $1 seconds ago
-- (--finished-retention), or given pending work again since. O(1) per batch, never a scan of
-- tally.record: counts come from tally.batch_count (at most 16 x 5 rows per batch) and the
-- oldest pending record is the first entry of the claim index for that batch, read only
-- when the batch has pending records.
select b.name, b.queue, b.state, b.total, b.paused_reason,
       c.pending, c.running, c.complete, c.failed, c.cancelled,
       b.started_at is not null as started,
       greatest(extract(epoch from now() - o.available_at), 0)::float8 as oldest_pending_age_s
  from tally.batch b
  left join tally.batch_progress p on p.batch_id = b.id
  cross join lateral (
      select coalesce(sum(n) filter (where state = 'pending'), 0)::bigint   as pending,
             coalesce(sum(n) filter (where state = 'running'), 0)::bigint   as running,
             coalesce(sum(n) filter (where state = 'complete'), 0)::bigint  as complete,
             coalesce(sum(n) filter (where state = 'failed'), 0)::bigint    as failed,
             coalesce(sum(n) filter (where state = 'cancelled'), 0)::bigint as cancelled
        from tally.batch_count
       where batch_id = b.id) c
  left join lateral (
      select r.available_at
        from tally.record r
       where c.pending > 0 and r.batch_id = b.id and r.available_at is not null
       order by r.available_at
       limit 1) o on true
 where p.finished_at is null
    or p.finished_at > now() - make_interval(secs => $1::float8)
    -- Finished long ago: shown again only once given pending work (retry-failed). Last, so
    -- that only such batches pay for this probe of the claim index.
    or (select r.available_at
          from tally.record r
         where r.batch_id = b.id and r.available_at is not null
         order by r.available_at
         limit 1) is not null
 order by b.id
