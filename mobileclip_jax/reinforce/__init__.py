"""Making reinforced datasets: teacher-ensemble embeddings, stored augmentations, synthetic captions.

teachers.py (loading teachers, jitted sharded embedding), captioners.py (captioners, near-duplicate
regeneration and caption measures), inputs.py (input shards), settings.py (generation settings,
the reinforce config JSON), generate.py (the resumable per-shard loop). Entry point:
launch/reinforce.py.
"""
