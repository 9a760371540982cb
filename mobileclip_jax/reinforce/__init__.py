"""mobileclip_jax.reinforce."""
