-- Latest applied migration; run only after checking that tally.migration exists.
select coalesce(max(version), 0) from tally.migration
