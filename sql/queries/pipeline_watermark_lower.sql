-- A run started again makes its window not done: the watermark goes back to its start if it
-- was past it. $1 run id
update tally.pipeline p
   set watermark = r.window_start, updated_at = now()
  from tally.pipeline_run r
 where r.id = $1 and p.name = r.pipeline and p.watermark > r.window_start
