"""mobileclip_jax.benchmark."""
