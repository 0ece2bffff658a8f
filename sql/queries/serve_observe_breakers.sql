-- Circuit breakers that are open now or were open when `serve` last looked, with the episode
-- counter of each queue.
select k.queue, k.state, k.consecutive_failures,
       to_char(k.open_until at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') as open_until,
       coalesce(q.breaker_open, false), coalesce(q.breaker_episode, 0)
  from tally.breaker k
  left join tally.queue_progress q on q.queue = k.queue
 where k.state <> 'closed' or q.breaker_open
 order by k.queue
