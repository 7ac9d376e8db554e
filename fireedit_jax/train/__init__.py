"""fireedit_jax.train."""
