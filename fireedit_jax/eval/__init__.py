"""fireedit_jax.eval."""
