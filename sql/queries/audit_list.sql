-- The latest $3 actions on batch $1 or on run $2 (one of them null), newest first.
select to_char(at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), actor, action,
       batch, run, detail, rows
  from tally.audit
 where ($1::text is not null and batch = $1) or ($2::text is not null and run = $2)
 order by id desc
 limit $3
