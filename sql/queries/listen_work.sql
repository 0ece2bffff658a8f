listen tally_work
