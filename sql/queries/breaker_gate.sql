-- $1 queue, $2 owner, $3 probe timeout in ms
select tally.breaker_gate($1, $2, $3)
