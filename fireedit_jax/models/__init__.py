"""fireedit_jax.models."""
