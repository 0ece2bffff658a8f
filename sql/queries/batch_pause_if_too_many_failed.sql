-- Pauses batch $1 when its failed rows exceed what it tolerates; returns the reason if it did.
with limits as (
    select id,
           least(coalesce(max_failed::float8, 'Infinity'),
                 coalesce(floor(max_failed_ratio * total), 'Infinity')) as tolerated
      from tally.batch
     where id = $1 and state = 'ready'
       and (max_failed is not null or max_failed_ratio is not null)
),
failed as (
    select coalesce(sum(n), 0) as n from tally.batch_count where batch_id = $1 and state = 'failed'
)
update tally.batch b
   set state = 'paused',
       paused_reason = 'too many failures: ' || failed.n || ' failed records, '
                       || limits.tolerated::bigint || ' tolerated',
       updated_at = now()
  from limits, failed
 where b.id = limits.id and b.state = 'ready' and failed.n > limits.tolerated
returning b.paused_reason
