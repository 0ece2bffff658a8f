-- A rerun's old stages; their batches stay as they are. $1 run id
delete from tally.pipeline_stage where run_id = $1
