"""Making reinforced datasets: teacher-ensemble embeddings, stored augmentations, synthetic captions.

teachers.py (loading teachers, jitted sharded embedding), captions.py (captioners, near-duplicate
regeneration and caption measures), sources.py (input shards), config.py (generation settings,
the reinforce config JSON), generate.py (the resumable per-shard loop). Entry point:
launch/reinforce.py.
"""
