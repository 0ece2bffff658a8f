-- A pipeline's watermark, and the length in seconds of the window that ended at it. $1 name
select to_char(p.watermark, 'YYYY-MM-DD HH24:MI:SS'),
       (select extract(epoch from r.window_end - r.window_start)::float8
          from tally.pipeline_run r
         where r.pipeline = p.name and r.window_start is not null
           and r.window_end = p.watermark and r.state = 'succeeded'
         limit 1)
  from tally.pipeline p
 where p.name = $1
