-- $1 queue, $2 owner, $3 successes, $4 retryable failures, $5 threshold, $6 cooldown ms,
-- $7 longest cooldown ms
select tally.breaker_report($1, $2, $3, $4, $5, $6, $7)
