-- Readiness: the database answers.
select 1
