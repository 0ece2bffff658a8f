-- The uniqueness check of a large batch aggregates every id: give it room before it spills.
set local work_mem = '256MB'
