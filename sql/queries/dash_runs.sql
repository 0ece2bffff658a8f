-- Pipeline runs, newest first, one page: $1 pipeline or null, $2 state or null, $3 only runs
-- with a smaller id (keyset; null for the first page), $4 page size.
select r.id, r.name, r.pipeline, r.state, r.params::text, r.attempt, r.episode,
       to_char(r.created_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
       to_char(r.started_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
       to_char(r.finished_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
       r.backfill_id,
       (select count(*) from tally.pipeline_stage s where s.run_id = r.id)::bigint,
       (select count(*) from tally.pipeline_stage s
         where s.run_id = r.id and s.state = 'succeeded')::bigint
  from tally.pipeline_run r
 where ($1::text is null or r.pipeline = $1)
   and ($2::text is null or r.state = $2)
   and ($3::bigint is null or r.id < $3)
 order by r.id desc
 limit $4
