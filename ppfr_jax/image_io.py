"""The one image decoder of ppfr_jax: encoded bytes or a file -> (H, W, 3) uint8 RGB.

Every reader goes through :func:`decode_rgb` (training through
``tf.numpy_function``, verification sets, ``ppfr-align``, ``ppfr-protect``),
so a face has the same pixels in training and in evaluation. Every mode
becomes RGB: grey replicated, 16/32-bit reduced to the high byte, alpha
dropped, palette / CMYK / YCbCr converted, EXIF orientation applied, first
frame of animations; other modes (``F``, LAB, HSV, ...) are refused.

Bounds: the header is read first; an image of more than ``max_pixels`` pixels
(default :data:`MAX_PIXELS`), of another size than ``expect_hw``, or whose RGB
pixels would take more than ``max(MAX_INFLATION * its encoded size,
INFLATION_FLOOR)`` bytes is refused before any pixel is decoded (SECURITY.md).
Every failure is :class:`ImageDecodeError` naming the image. Why PIL and not
TensorFlow's decoders, and each mode in detail: README, Differences from the
reference, Data pipeline: image decoding.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from ppfr_jax.errors import PpfrError

__all__ = ["EXTENSIONS", "ImageDecodeError", "MAX_PIXELS", "decode_rgb", "image_size", "pil_to_rgb"]

# File names the folder readers (training folders, ppfr-protect, ppfr-align) take as images.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_PIXELS = 1 << 26  # 67M pixels (an 8192 x 8192 photo): 192 MiB as RGB
# decoded RGB bytes per encoded byte (JPEG photos and faces: ~5-20; flat PNGs reach ~1000), with a floor
# that every small image fits in (a 250 x 250 LFW photo is 188 KB as RGB)
MAX_INFLATION = 256
INFLATION_FLOOR = 256 << 10
_ORIENTATION = 0x0112
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_TO_RGB = ("RGB", "L", "1", "RGBA", "RGBX", "RGBa", "LA", "La", "P", "PA", "CMYK", "YCbCr")


class ImageDecodeError(PpfrError, ValueError):
    """An image cannot be used (unreadable, unsupported, too large, wrong size); the message names it."""


def _open(src, what: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # our own pixel limit (below PIL's) is checked right after, with the image named
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src)
    except FileNotFoundError:
        raise ImageDecodeError(f"{what}: image not found") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{what}: image too large ({e})") from None
    except Image.UnidentifiedImageError:
        # PIL's own text names its file object ("<_io.BytesIO object at 0x...>"): noise, the image is named here
        kind = f"{len(src)} bytes" if isinstance(src, (bytes, bytearray, memoryview)) else "file"
        raise ImageDecodeError(f"{what}: cannot decode image ({kind} not in an image format PIL reads, such as "
                               f"JPEG, PNG or BMP)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise ImageDecodeError(f"{what}: cannot decode image ({e})") from None


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied (from the header only)."""
    w, h = im.size
    try:
        o = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001  (a corrupt EXIF block: PIL raises many kinds; treat as no orientation)
        o = 1
    return (h, w) if o in (5, 6, 7, 8) else (w, h)


def image_size(src, what: str | None = None) -> tuple[int, int]:
    """(width, height) of an image as :func:`decode_rgb` returns it, reading only the header."""
    what = what or (f"{os.fspath(src)}" if not isinstance(src, (bytes, bytearray, memoryview)) else "image")
    im = _open(src, what)
    try:
        return _oriented_size(im)
    finally:
        im.close()


def decode_rgb(src, what: str | None = None, *, expect_hw: tuple[int, int] | None = None,
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode one image to RGB.

    Args:
      src: encoded bytes, or a path.
      what: how to name the image in errors (default: the path, or "image").
      expect_hw: (H, W) the decoded image must have; checked on the header,
        before decoding.
      max_pixels: refuse images with more pixels than this (header check).
    Returns:
      (H, W, 3) uint8, C-contiguous.
    Raises:
      ImageDecodeError naming ``what``: not found, not an image, truncated or
      corrupt, unsupported mode, more than ``max_pixels`` pixels, or not ``expect_hw``.
    """
    if what is None:
        what = "image" if isinstance(src, (bytes, bytearray, memoryview)) else os.fspath(src)
    im = _open(src, what)
    try:
        w, h = _oriented_size(im)
        if w * h > max_pixels:
            raise ImageDecodeError(f"{what}: image is {w}x{h} (WxH), more than the {max_pixels} pixels "
                                   f"this reader accepts")
        if expect_hw is not None and (h, w) != tuple(expect_hw):
            raise ImageDecodeError(f"{what}: image is {w}x{h} (WxH), expected {expect_hw[1]}x{expect_hw[0]}")
        encoded = len(src) if isinstance(src, (bytes, bytearray, memoryview)) else os.path.getsize(src)
        if 3 * w * h > max(MAX_INFLATION * encoded, INFLATION_FLOOR):
            raise ImageDecodeError(f"{what}: a {encoded}-byte file declares a {w}x{h} image ({3 * w * h} bytes of "
                                   f"pixels), more than {MAX_INFLATION}x its size: refused as a decompression bomb")
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im, what)
        except ImageDecodeError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError, IndexError, TypeError,
                Image.DecompressionBombError) as e:
            raise ImageDecodeError(f"{what}: cannot decode image ({type(e).__name__}: {e})") from None
    finally:
        im.close()


def pil_to_rgb(im: Image.Image, what: str = "image") -> np.ndarray:
    """An already opened PIL image -> (H, W, 3) uint8 by the rules of :func:`decode_rgb`
    (EXIF orientation applied; no size limits: the caller chose to decode it)."""
    try:
        im.load()
        return _to_rgb(ImageOps.exif_transpose(im), what)
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise ImageDecodeError(f"{what}: cannot decode image ({type(e).__name__}: {e})") from None


def _to_rgb(im: Image.Image, what: str) -> np.ndarray:
    mode = im.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        a = np.asarray(im)
        if a.ndim != 2:
            raise ImageDecodeError(f"{what}: unexpected {mode} image of shape {a.shape}")
        a = (np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    if mode not in _TO_RGB:
        raise ImageDecodeError(f"{what}: unsupported image mode {mode!r} (8/16-bit grey, RGB(A), palette, "
                               f"CMYK and YCbCr are read)")
    rgb = im if mode == "RGB" else im.convert("RGB")
    a = np.asarray(rgb, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ImageDecodeError(f"{what}: decoded to shape {a.shape}, expected (H, W, 3)")
    return np.ascontiguousarray(a)
