"""FireEdit in JAX/Flax."""
