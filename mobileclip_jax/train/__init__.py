"""mobileclip_jax.train."""
