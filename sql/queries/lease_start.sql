-- Announces, before their handlers start, how many rows of each lease (a prefix of its
-- `record_ids`) were handed to a handler, and renews those leases. $1 lease ids, $2 started
-- counts, $3 owner, $4 seconds. A lease missing from the result was rescued: its rows are
-- no longer this worker's and must not start.
update tally.lease l
   set started = greatest(l.started, v.started),
       expires_at = now() + make_interval(secs => $4)
  from unnest($1::bigint[], $2::int[]) as v(id, started)
 where l.id = v.id and l.owner = $3
returning l.id
