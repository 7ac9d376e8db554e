"""fireedit_jax.data."""
