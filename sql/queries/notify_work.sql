-- Wakes workers of a queue. $1 queue
select pg_notify('tally_work', $1)
