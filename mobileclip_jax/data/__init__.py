"""mobileclip_jax.data."""
