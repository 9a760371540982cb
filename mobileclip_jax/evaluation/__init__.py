"""mobileclip_jax.evaluation."""
