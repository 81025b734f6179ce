"""e4t-jax: encoder-based domain tuning (E4T) for Stable Diffusion in JAX/Flax."""

__version__ = "0.2.0"
