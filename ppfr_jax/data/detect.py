"""Faces and their five landmarks in raw photos (MTCNN), then the project's 5-point alignment.

``detect_faces(image) -> [Face(box, score, landmarks), ...]``, largest first:
``image`` is an (H, W, 3) uint8 RGB array of any size (what
:func:`ppfr_jax.image_io.decode_rgb` returns); ``box`` is float32 (4,)
``(x1, y1, x2, y2)`` in pixels, clipped to the image; ``score`` the detector's
confidence in [0, 1]; ``landmarks`` float32 (5, 2) pixel ``(x, y)`` in the
order of :mod:`ppfr_jax.align`'s templates (image-left eye, image-right eye,
nose tip, image-left mouth corner, image-right mouth corner: MTCNN's
``left_eye, right_eye, nose, mouth_left, mouth_right``, which are image-left
first too). ``largest_face`` picks the face with the largest box area and
returns how many there were; ``detect_and_align`` aligns it to a template
(``"arcface"``: 112x112 uint8).

Errors: :class:`NoFaceError` (a ``PpfrError`` and ``ValueError``) naming the
file when a photo has no face; ``ValueError`` for an array that is not
(H, W, 3) uint8; ``ImportError`` with the install line when the ``mtcnn``
package is missing.

Source: the ``mtcnn`` package (PyPI ``mtcnn`` >= 1.0, MIT licence, by Iván de
Paz Centeno), whose P-, R- and O-net weights ship inside the wheel
(``mtcnn/assets/weights/*.lz4``), so nothing is downloaded at run time; it
runs on TensorFlow, which is why this module lives in the input pipeline
(``ppfr_jax.data``). Method: K. Zhang, Z. Zhang, Z. Li, Y. Qiao, "Joint Face
Detection and Alignment Using Multitask Cascaded Convolutional Networks",
IEEE SPL 2016. One detector per process, built on first use (about 2 s to
import TensorFlow and load it), then about 0.13 s per 250x250 photo on one
CPU core (bench/RESULTS.md, "Raw photos"). How its points compare with the
LFW 5-point table: bench/RESULTS.md and ``tests/test_detect.py``.
"""
from __future__ import annotations

import functools
import threading
from typing import NamedTuple

import numpy as np
from absl import logging

from ppfr_jax import align
from ppfr_jax.errors import PpfrError

__all__ = ["Face", "NoFaceError", "detect_and_align", "detect_faces", "largest_face"]

# MTCNN keypoint names in our 5-point order (image-left first, as the templates)
KEYPOINTS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


class NoFaceError(PpfrError, ValueError):
    """The detector found no face in a photo; the message names the file."""


class Face(NamedTuple):
    box: np.ndarray        # float32 (4,) x1, y1, x2, y2 pixels, clipped to the image
    score: float           # detector confidence in [0, 1]
    landmarks: np.ndarray  # float32 (5, 2) pixel (x, y), our 5-point order

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.box)
        return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _detector():
    try:
        from mtcnn import MTCNN  # imports TensorFlow
    except ImportError as e:
        raise ImportError(f"face detection needs the mtcnn package (python3 -m pip install 'mtcnn>=1.0'): {e}") from e
    return MTCNN(stages="face_and_landmarks_detection", device="CPU:0")


def detect_faces(image, *, min_face_size: int = 20) -> list[Face]:
    """All faces in an RGB photo, largest box first (module doc: shapes, order, units).

    Args:
      image: (H, W, 3) uint8 RGB array (or a PIL image, converted).
      min_face_size: smallest face side in pixels the detector looks for (MTCNN's default 20).
    Returns:
      list of :class:`Face`, possibly empty.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        from ppfr_jax import image_io
        image = image_io.pil_to_rgb(image)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"detect_faces needs an (H, W, 3) uint8 RGB image, got {arr.shape} {arr.dtype}")
    if min(arr.shape[:2]) < 12:  # smaller than MTCNN's 12x12 proposal window: nothing to find
        return []
    with _LOCK:  # one detector per process, built once; TF runs its ops multi-threaded already
        rows = _detector().detect_faces(np.ascontiguousarray(arr), box_format="xyxy", output_type="numpy",
                                min_face_size=int(min_face_size))
    rows = np.asarray(rows, np.float64).reshape(-1, 16)
    # row: image_id, x1, y1, x2, y2, confidence, then the five x (left_eye, right_eye, nose, mouth_left,
    # mouth_right), then their five y (mtcnn.utils.landmarks.parse_landmarks); sub-pixel, where the
    # package's "json" output rounds them to integers
    faces = [Face(box=r[1:5].astype(np.float32), score=float(r[5]),
                  landmarks=np.stack([r[6:11], r[11:16]], 1).astype(np.float32)) for r in rows]
    faces.sort(key=lambda f: -f.area)
    return faces


def largest_face(image, *, path=None, min_face_size: int = 20) -> tuple[Face, int]:
    """The face with the largest box, and how many faces the photo has.

    Args:
      image: as :func:`detect_faces`.
      path: the file the image came from, named in the error and the log line.
    Returns:
      (Face, n_faces >= 1).
    Raises:
      NoFaceError: no face found.
    """
    faces = detect_faces(image, min_face_size=min_face_size)
    what = str(path) if path is not None else "image"
    if not faces:
        raise NoFaceError(f"{what}: no face found (MTCNN, min_face_size={min_face_size})")
    if len(faces) > 1:
        logging.log_first_n(logging.INFO, "%s: %d faces, took the largest (box %s)", 5, what, len(faces),
                            [round(float(v), 1) for v in faces[0].box])
    return faces[0], len(faces)


def detect_and_align(image, template: str = "arcface", *, path=None,
                     min_face_size: int = 20) -> tuple[np.ndarray, np.ndarray, int]:
    """Detect the largest face and align it to a 5-point template.

    Args:
      image: as :func:`detect_faces`.
      template: a key of ``ppfr_jax.align.TEMPLATES`` (``"arcface"``: 112x112).
      path: named in errors.
    Returns:
      (aligned uint8 (H_t, W_t, 3), landmarks float32 (5, 2) in ``image``, n_faces).
    Raises:
      NoFaceError: no face; ValueError: a bad image or template, degenerate landmarks.
    """
    face, n = largest_face(image, path=path, min_face_size=min_face_size)
    aligned, _ = align.align_face(image, face.landmarks, template)
    return aligned, face.landmarks, n
