"""Flax Linen backbones. NHWC inside; see ``ppfr_jax.frequency`` for NCHW helpers."""
