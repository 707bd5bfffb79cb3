"""ppfr_jax: privacy-preserving face recognition (DuetFace, MinusFace) in JAX/Flax.

The model, frequency and training-step modules import without TensorFlow; only
the tf.data sources of ``ppfr_jax.data`` (and the CLIs that read data) import it.
"""

__version__ = "0.1.0"
