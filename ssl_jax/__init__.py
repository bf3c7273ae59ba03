"""ssl_jax: semi-supervised remote-sensing scene classification in JAX/Flax."""

__version__ = "0.1.0"
