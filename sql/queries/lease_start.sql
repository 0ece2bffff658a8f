-- Announces, before their handlers start, how many rows of each lease (a prefix of its
-- `record_ids`) were handed to a handler, and renews those leases. $1 lease ids, $2 started
-- counts, $3 owner, $4 seconds. A lease missing from the result was rescued: its rows are
-- no longer this worker's and must not start. A lease past half its time is renewed too;
-- otherwise `expires_at` keeps its value, so that the update stays HOT (no index write).
--
-- Sent every time handler slots free up, so its commit does not wait for the WAL flush
-- (synchronous_commit off for this statement's own transaction only): the rescue reads it
-- at once from the running server, and only a crash of the server itself can forget the
-- last few milliseconds of announcements, giving those rows their attempt back.
update tally.lease l
   set started = greatest(l.started, v.started),
       expires_at = case when l.expires_at < now() + make_interval(secs => $4::float8 / 2)
                         then now() + make_interval(secs => $4::float8)
                         else l.expires_at end
  from unnest($1::bigint[], $2::int[]) as v(id, started),
       (select set_config('synchronous_commit', 'off', true)) as async
 where l.id = v.id and l.owner = $3
returning l.id
