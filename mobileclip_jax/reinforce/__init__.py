"""Making reinforced datasets: teacher-ensemble embeddings, stored augmentations, synthetic captions.

teachers.py (loading teachers, jitted sharded embedding), captioners.py (captioners, their specs,
near-duplicate regeneration and caption measures), coca_captioner.py (a CoCa model sampling captions
in JAX), inputs.py (input shards), settings.py (generation settings,
the reinforce config JSON), generate.py (the resumable per-shard loop). Entry point:
launch/reinforce.py.
"""
