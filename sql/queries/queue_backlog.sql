-- Records of a queue that still need a worker: pending in ready batches plus running anywhere.
-- The autoscaler (KEDA's postgresql trigger, deploy/k8s/keda.yaml) polls this, so it reads the
-- maintained counts (at most 16 slot rows per batch and state), never tally.record. $1 queue
select coalesce(sum(c.n), 0)::bigint as backlog
  from tally.batch b
  join tally.batch_count c on c.batch_id = b.id
 where b.queue = $1
   and b.state in ('ready', 'paused')
   and (c.state = 'running' or (c.state = 'pending' and b.state = 'ready'))
