-- Records what `serve` observed of batch $1: $2 done (complete + failed), $3 whether the
-- progress clock restarts now, $4 finished, $5 finish episode, $6 stalled, $7 stall episode,
-- $8 paused by its failure limit, $9 that episode, $10 failed.
insert into tally.batch_progress as p
       (batch_id, done, changed_at, finished, finished_at, finish_episode,
        stalled, stall_episode, limit_paused, limit_episode, failed)
values ($1, $2, now(), $4, case when $4 then now() end, $5, $6, $7, $8, $9, $10)
on conflict (batch_id) do update
   set done = excluded.done,
       changed_at = case when $3 then now() else p.changed_at end,
       finished = excluded.finished,
       finished_at = case when not excluded.finished then null
                          when p.finished and p.finish_episode = excluded.finish_episode
                              then p.finished_at
                          else now() end,
       finish_episode = excluded.finish_episode,
       stalled = excluded.stalled,
       stall_episode = excluded.stall_episode,
       limit_paused = excluded.limit_paused,
       limit_episode = excluded.limit_episode,
       failed = excluded.failed
