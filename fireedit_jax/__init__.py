"""FireEdit in JAX/Flax."""

from fireedit_jax import storage as _storage  # noqa: F401 - first: points TensorStore at a storage emulator if one is set
