-- Records whether queue $1's breaker is open ($2) and its episode ($3).
insert into tally.queue_progress as q (queue, breaker_open, breaker_episode)
values ($1, $2, $3)
on conflict (queue) do update
   set breaker_open = excluded.breaker_open, breaker_episode = excluded.breaker_episode
