"""fireedit_jax.convert."""
