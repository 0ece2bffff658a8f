-- The newest alert's id (0 if none): alerts up to it are not this replica's to deliver.
select coalesce(max(id), 0)::bigint from tally.alert
