"""fireedit_jax.diffusion."""
