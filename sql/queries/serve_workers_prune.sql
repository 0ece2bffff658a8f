-- Rows of workers not seen for a day go; run by the observation pass.
delete from tally.worker where seen_at < now() - interval '1 day'
