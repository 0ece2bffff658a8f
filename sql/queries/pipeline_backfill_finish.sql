-- Ends a backfill whose runs have all ended: failed if any of them failed. $1 backfill id
update tally.pipeline_backfill b
   set state = case when exists (select 1 from tally.pipeline_run r
                                  where r.backfill_id = b.id and r.state = 'failed')
                    then 'failed' else 'succeeded' end,
       finished_at = now()
 where b.id = $1 and b.state = 'running'
   and not exists (select 1 from tally.pipeline_run r
                    where r.backfill_id = b.id and r.state in ('queued', 'running'))
