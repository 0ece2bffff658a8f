copy tally.record (batch_id, record_id, payload) from stdin
