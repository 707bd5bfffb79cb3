"""Five-point similarity alignment of face images (pure numpy + PIL), as cv2 does it.

``align_face(image (H, W, 3), landmarks5 (5, 2)) -> (aligned uint8, matrix
(2, 3))``: the least-squares similarity transform (Umeyama) maps the five
points (image-left eye, image-right eye, nose tip, image-left mouth corner,
image-right mouth corner) onto a template, then a bilinear warp with a black
border (``cv2.warpAffine(img, M, size, borderValue=0)``). Templates:
``"arcface"`` (insightface / TFace, 112x112) and ``"sphereface"`` (96(W) x
112(H), CASIA-WebFace models). Pixel coordinates follow cv2 (pixel (r, c) is
the point (x=c, y=r)); normalised ones are ``((x + 0.5) / W, (y + 0.5) / H)``.
Errors: ``ValueError`` for wrong shapes, non-finite or degenerate landmarks,
an unknown template or a bad landmark table. Details: README, Differences
from the reference, Alignment.

CLI (``ppfr-align``)::

    ppfr-align --images lfw/lfw-deepfunneled --landmarks lfw/derived/lfw-deepfunneled_5pt.tsv \\
        --out aligned112 [--template arcface] [--quality 95]

writes ``<out>/<identity>/<file>.jpg`` for every image with a landmark row;
without ``--landmarks`` the faces and their points come from a detector
(``ppfr_jax.data.detect``, raw photos of any size).
"""
from __future__ import annotations

import io
import os
import pathlib
from typing import Mapping

import numpy as np
from PIL import Image, ImageOps

from ppfr_jax import image_io

# (x, y) pixel coordinates, order: eye, eye, nose, mouth corner, mouth corner (image-left first).
SPHEREFACE_96x112 = np.array(
    [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]],
    np.float64)
ARCFACE_112 = SPHEREFACE_96x112 + np.array([8.0, 0.0])

# name -> (template points (5, 2), output size (H, W))
TEMPLATES: dict[str, tuple[np.ndarray, tuple[int, int]]] = {
    "arcface": (ARCFACE_112, (112, 112)),
    "sphereface": (SPHEREFACE_96x112, (112, 96)),
}

def template(name: str) -> tuple[np.ndarray, tuple[int, int]]:
    """-> (points (5, 2) float64 pixel coords, output size (H, W)) of a named template."""
    try:
        pts, size = TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown alignment template {name!r}; known: {sorted(TEMPLATES)}") from None
    return pts.copy(), size


def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """Least-squares similarity transform taking ``src`` onto ``dst``.

    Args:
      src, dst: (K, 2) corresponding points, K >= 2.
      estimate_scale: False gives a rigid transform (scale 1).
    Returns:
      (3, 3) float64 homogeneous matrix T with ``dst ~= (T @ [x, y, 1])[:2]``.
    Raises:
      ValueError on mismatched shapes, non-finite points or degenerate ``src``
      (all points equal), which has no unique transform.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"umeyama needs two (K>=2, 2) point sets of equal shape, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("umeyama: landmarks contain NaN or inf")
    k = src.shape[0]
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0 ** 2).sum() / k
    if var_s <= 1e-12:
        raise ValueError("umeyama: source points are degenerate (all equal)")
    cov = d0.T @ s0 / k
    u, sig, vt = np.linalg.svd(cov)
    # Reflection guard: a similarity must keep orientation.
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var_s if estimate_scale else 1.0
    t = np.eye(3)
    t[:2, :2] = scale * rot
    t[:2, 2] = mu_d - scale * rot @ mu_s
    return t


def estimate_alignment(landmarks5: np.ndarray, template_name: str = "arcface") -> np.ndarray:
    """(5, 2) pixel landmarks of a source image -> (2, 3) matrix mapping it onto the template."""
    lm = np.asarray(landmarks5, np.float64)
    if lm.shape != (5, 2):
        raise ValueError(f"alignment needs 5 landmarks as a (5, 2) array, got shape {lm.shape}")
    pts, _ = template(template_name)
    return umeyama(lm, pts)[:2]


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine matrix to (..., 2) pixel points."""
    p = np.asarray(points, np.float64)
    m = np.asarray(matrix, np.float64)
    return p @ m[:, :2].T + m[:, 2]


def normalize_points(points: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(..., 2) pixel points (cv2 convention) -> normalised [0, 1] (x/W, y/H), see module doc."""
    h, w = size_hw
    p = np.asarray(points, np.float64)
    return (p + 0.5) / np.array([w, h], np.float64)


def denormalize_points(points: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`normalize_points`."""
    h, w = size_hw
    return np.asarray(points, np.float64) * np.array([w, h], np.float64) - 0.5


def warp_affine(image, matrix: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear warp with a black border (cv2.warpAffine semantics: INTER_LINEAR, BORDER_CONSTANT 0).

    uint8 images go through PIL's C resampler (faster: bench/RESULTS.md);
    other dtypes through :func:`warp_affine_numpy`. The two agree to 1 grey
    level (rounding), borders included (``tests/test_align.py``).

    Args:
      image: PIL image, or (H, W, C) / (H, W) array.
      matrix: (2, 3) forward transform, source pixel -> output pixel.
      size_hw: output (H, W).
    Returns:
      (H_out, W_out[, C]) array, same dtype as ``image`` (uint8 for PIL input).
    """
    if isinstance(image, Image.Image):
        pil = image if image.mode in ("RGB", "L") else Image.fromarray(image_io.pil_to_rgb(image))
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3))):
            return warp_affine_numpy(arr, matrix, size_hw)
        pil = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    m = np.vstack([np.asarray(matrix, np.float64), [0.0, 0.0, 1.0]])
    if not np.isfinite(m).all() or abs(np.linalg.det(m)) < 1e-12:
        raise ValueError(f"warp_affine: matrix is singular or not finite: {m[:2].tolist()}")
    (a, b, c), (d, e, f) = np.linalg.inv(m)[:2]
    # PIL samples output pixel x at x + 0.5 and reads input pixel i at i + 0.5 (continuous
    # coordinates); a 2-pixel zero frame makes its edge taps blend with black as cv2's do.
    pad = 2
    framed = ImageOps.expand(pil, border=pad, fill=0)
    c_pil = c + pad + 0.5 - 0.5 * (a + b)
    f_pil = f + pad + 0.5 - 0.5 * (d + e)
    h_out, w_out = size_hw
    out = np.asarray(framed.transform((w_out, h_out), Image.Transform.AFFINE, (a, b, c_pil, d, e, f_pil),
                                      resample=Image.Resampling.BILINEAR, fillcolor=0))
    if not isinstance(image, Image.Image) and np.asarray(image).ndim == 3 and out.ndim == 2:
        out = out[..., None]
    return out


def warp_affine_numpy(image: np.ndarray, matrix: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Reference implementation of :func:`warp_affine` in numpy (any dtype; float math)."""
    img = np.asarray(image)
    squeeze = img.ndim == 2
    if squeeze:
        img = img[..., None]
    if img.ndim != 3:
        raise ValueError(f"warp_affine needs an (H, W[, C]) image, got shape {np.shape(image)}")
    h_out, w_out = size_hw
    m = np.vstack([np.asarray(matrix, np.float64), [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(m)[:2]
    ys, xs = np.mgrid[0:h_out, 0:w_out].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0 = np.floor(sx).astype(np.int64)
    y0 = np.floor(sy).astype(np.int64)
    fx = (sx - x0)[..., None]
    fy = (sy - y0)[..., None]
    h, w = img.shape[:2]
    # Zero-padding by one pixel makes out-of-range neighbours read as border (0).
    pad = np.zeros((h + 2, w + 2, img.shape[2]), np.float64)
    pad[1:-1, 1:-1] = img

    def tap(yy, xx):
        # Anything beyond the first ring clips onto the zero ring as well.
        return pad[np.clip(yy + 1, 0, h + 1), np.clip(xx + 1, 0, w + 1)]

    out = ((1 - fy) * ((1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1))
           + fy * ((1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)))
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        out = np.clip(np.floor(out + 0.5), info.min, info.max)
    out = out.astype(img.dtype)
    return out[..., 0] if squeeze else out


def align_face(image, landmarks5: np.ndarray, template_name: str = "arcface") -> tuple[np.ndarray, np.ndarray]:
    """Align one face.

    Args:
      image: PIL image or (H, W, 3) uint8 array.
      landmarks5: (5, 2) pixel coordinates in ``image`` (order as the template).
      template_name: a key of ``TEMPLATES``.
    Returns:
      (aligned uint8 (H_t, W_t, 3), matrix (2, 3) source pixel -> aligned pixel).
    """
    if isinstance(image, Image.Image):
        image = image_io.pil_to_rgb(image)
    elif np.asarray(image).ndim != 3 or np.asarray(image).shape[2] != 3:
        raise ValueError(f"align_face needs an RGB image (H, W, 3), got shape {np.shape(image)}")
    m = estimate_alignment(landmarks5, template_name)
    _, size = template(template_name)
    return warp_affine(image, m, size), m


def read_landmarks_tsv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a 5-point landmark table: ``path x1 y1 ... x5 y5`` per line (tab or space separated).

    Lines starting with ``#`` are comments. Returns {path as written: (5, 2) float64}.
    Raises ValueError naming the file and line for malformed rows.
    """
    out: dict[str, np.ndarray] = {}
    with open(path, "r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) != 11:
                raise ValueError(f"{path}:{line_no}: expected 'path' + 10 coordinates, got {len(parts)} fields")
            try:
                pts = np.array([float(v) for v in parts[1:]], np.float64).reshape(5, 2)
            except ValueError:
                raise ValueError(f"{path}:{line_no}: non-numeric coordinate in {line!r}") from None
            out[parts[0]] = pts
    return out


class LandmarkLookup:
    """Find an image's landmarks by its path, tolerant of differing roots.

    A table written relative to one folder (``lfw-deepfunneled/A/A_0001.jpg``)
    is looked up by the exact key first, then by the last two path components
    (``identity/file``), which is what identifies an image in a one-folder-per-
    identity layout.
    """

    def __init__(self, table: Mapping[str, np.ndarray]):
        self.table = dict(table)
        self.by_tail = {}
        for k, v in self.table.items():
            self.by_tail.setdefault(self._tail(k), v)

    @staticmethod
    def _tail(path: str) -> str:
        parts = pathlib.PurePath(path).parts
        return "/".join(parts[-2:])

    def get(self, path: str) -> np.ndarray | None:
        if path in self.table:
            return self.table[path]
        return self.by_tail.get(self._tail(path))


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes (PIL, 4:2:0 as PIL's default)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()

