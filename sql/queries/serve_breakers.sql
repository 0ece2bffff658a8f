-- Every queue's circuit breaker (one row per queue that ever reported).
select queue, state from tally.breaker order by queue
