select to_regclass('tally.migration') is not null
