-- The batch to purge, locked, with whether anything of it is left to do. $1 name
select b.id, b.state,
       coalesce((select sum(c.n) from tally.batch_count c
                  where c.batch_id = b.id and c.state in ('pending', 'running')), 0)::bigint
  from tally.batch b
 where b.name = $1
   for update of b
