"""lcseg: land-cover segmentation in JAX/Flax."""
