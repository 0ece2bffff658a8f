-- Every pipeline's watermark, as seconds since the epoch (UTC).
select name, extract(epoch from watermark)::float8
  from tally.pipeline
 where watermark is not null
 order by name
