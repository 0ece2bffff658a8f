-- One throughput sample per batch that is unfinished or finished within the last minute, and
-- samples older than two days removed. Run by the observation pass, under its lock.
with saved as (
    insert into tally.batch_sample (batch_id, at, done, failed)
    select batch_id, now(), done, failed
      from tally.batch_progress
     where not finished or finished_at > now() - interval '1 minute'
    on conflict do nothing
)
delete from tally.batch_sample where at < now() - interval '2 days'
