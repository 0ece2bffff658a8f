-- What serve's observation passes saw of batch $1 (done = complete + failed), oldest first,
-- since $2 seconds ago.
select extract(epoch from at)::float8, done, failed
  from tally.batch_sample
 where batch_id = $1 and at > now() - make_interval(secs => $2)
 order by at
