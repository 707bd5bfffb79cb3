"""Visual metrics of the privacy evaluation: SSIM / PSNR of an image against the face, in [0, 1].

Images enter as uint8 or float in [-1, 1] (``tasks.normalize_images``) and are mapped to
[0, 1] (:func:`to_unit`); ``dm_pix.ssim`` (11x11 Gaussian window, sigma 1.5, averaged over pixels
and colour channels) and ``dm_pix.psnr`` with ``max_val=1``. PSNR is capped at ``PSNR_CAP`` = 100 dB
(MSE 1e-10) so identical images give 100, not inf, and means and JSON stay finite.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from ppfr_jax import tasks

PSNR_CAP = 100.0



def to_unit(images) -> jax.Array:
    """uint8 [0, 255] or float [-1, 1] (N, H, W, C) -> float32 [0, 1]."""
    return tasks.normalize_images(jnp.asarray(images)) * 0.5 + 0.5


def visual_metrics(protected, face, *, psnr_cap: float = PSNR_CAP) -> dict[str, jax.Array]:
    """Per-image SSIM and PSNR of ``protected`` against ``face`` (dm-pix).

    Args:
      protected, face: (N, H, W, C) float images in [0, 1] (map uint8 / [-1, 1]
        inputs with ``to_unit`` first); same shape.
      psnr_cap: PSNR ceiling in dB (identical images give this instead of inf).
    Returns:
      ``{'ssim': (N,), 'psnr': (N,)}`` float32; SSIM with ``max_val=1``, an
      11x11 Gaussian window (sigma 1.5), averaged over pixels and channels.
    """
    import dm_pix

    a = jnp.asarray(protected, jnp.float32)
    b = jnp.asarray(face, jnp.float32)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"visual_metrics: need two (N, H, W, C) images of one shape, got {a.shape} and {b.shape}")
    return {"ssim": dm_pix.ssim(a, b, max_val=1.0),
            "psnr": jnp.minimum(dm_pix.psnr(a, b), psnr_cap)}
