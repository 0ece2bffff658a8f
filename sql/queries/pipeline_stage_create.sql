-- The stages of a new run, all waiting. $1 run id, $2 stage names, $3 batch names,
-- $4 depends_on (as JSON arrays of names)
insert into tally.pipeline_stage (run_id, stage, position, batch, depends_on)
select $1, s.stage, s.position::int, s.batch,
       array(select jsonb_array_elements_text(s.deps))
  from unnest($2::text[], $3::text[], $4::jsonb[]) with ordinality as s(stage, batch, deps, position)
