-- Moves the pipeline's watermark over every window that follows it and whose run succeeded;
-- with no watermark yet, from the earliest window any of its runs covers. The caller locks
-- the pipeline's row first, so that of two runs finishing at once the later one sees the
-- other. Returns the new watermark, if it moved. $1 pipeline
with recursive chain (at, depth) as (
    select coalesce(p.watermark,
                    (select min(r.window_start)
                       from tally.pipeline_run r
                      where r.pipeline = $1 and r.window_start is not null)),
           0
      from tally.pipeline p
     where p.name = $1
    union
    select r.window_end, c.depth + 1
      from chain c
      join tally.pipeline_run r
        on r.pipeline = $1 and r.window_start = c.at and r.state = 'succeeded'
       and r.window_end > c.at
)
update tally.pipeline p
   set watermark = m.at, updated_at = now()
  from (select max(at) as at from chain where depth > 0) m
 where p.name = $1 and m.at is not null and m.at is distinct from p.watermark
returning to_char(p.watermark, 'YYYY-MM-DD HH24:MI:SS')
