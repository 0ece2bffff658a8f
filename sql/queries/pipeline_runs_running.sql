-- Unfinished runs, oldest first, for an advancer's pass. $1 limit
select id from tally.pipeline_run where state = 'running' order by id limit $1
