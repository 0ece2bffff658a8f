select version from tally.migration order by version
