"""Verification sets: safe readers for insightface ``.bin`` files and LFW-style ``pairs.txt``, one loader.

- ``.bin`` (lfw.bin, cfp_fp.bin, agedb_30.bin, ...; the embedded demo set): a
  pickle of (list of 2P encoded images, list of P issame), read by
  :func:`load_bin` with an unpickler that builds only bytes, containers and
  bools (never code; SECURITY.md);
- ``pairs.txt`` over an image folder (:func:`read_pairs`), aligned on the fly
  from a 5-point landmark table when one is given.

:func:`load_set` (``"demo"`` | ``x.bin`` | ``pairs.txt``) is the one loader:
a :class:`VerificationSet` of distinct images uint8 (M, H, W, 3), pairs (P, 2)
rows into them, issame (P,) bool; ``.interleaved()`` gives the (2P, H, W, 3)
pair-order images the protocol takes. Images are decoded by
``image_io.decode_rgb``, as in training. No JAX or TensorFlow here.
Errors: :class:`BadInputError` (a ``PpfrError``, ``ValueError``) naming the
file and line / image (``skip_bad=True``: such pairs are dropped and listed).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import pickle
from typing import Any, Sequence

import numpy as np

from ppfr_jax import align, image_io, safe_npz, safe_pickle
from ppfr_jax.demo_data import demo_paths
from ppfr_jax.errors import PpfrError


class BadInputError(PpfrError, ValueError):
    """An evaluation input (pairs line, image, .bin) is unusable; the message names it."""


# What an insightface .bin may name: containers, bytes, bools/ints and plain numpy arrays/scalars (rebuilt
# from their bytes by safe_pickle; size-taking constructors such as bytes(n) are refused).
_BIN_ALLOWED = {**safe_pickle.builtins_allowlist("bytes", "bytearray", "list", "tuple", "bool", "int", "set",
                                                 "frozenset"),
                **safe_pickle.numpy_allowlist()}


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """Read an insightface verification ``.bin`` (a pickle of ``(images, issame)``).

    The pickle runs under ``ppfr_jax.safe_pickle``'s rules (SECURITY.md): only plain
    data is built, never code; memory is bounded by the file's bytes plus at most
    ``safe_pickle.MAX_OPCODES`` small objects; nesting at most ``safe_pickle.MAX_DEPTH``.

    Returns:
      (encoded images: list of 2P bytes, issame: (P,) bool).
    Raises:
      BadInputError naming the file for a missing, malformed, unsafe or over-limit file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            reader = safe_pickle.BoundedReader(f, os.fstat(f.fileno()).st_size)
            obj = safe_pickle.RestrictedUnpickler(reader, _BIN_ALLOWED, encoding="bytes").load()
        obj = safe_pickle.resolve(obj)
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except safe_pickle.UnsafePickleError as e:
        raise BadInputError(f"{path}: {e} (a verification .bin holds only encoded images and booleans)") from None
    except Exception as e:  # noqa: BLE001  (a hostile pickle can raise anything; name the file)
        raise BadInputError(f"{path}: not a readable verification .bin: {type(e).__name__}: {e}") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise BadInputError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise BadInputError(f"{path}: images must be a list, got {type(bins).__name__}")
    if isinstance(issame, np.ndarray):
        issame = issame.tolist() if issame.ndim <= 1 else None
    if not (isinstance(issame, (list, tuple)) and all(isinstance(s, (bool, int, np.bool_, np.integer))
                                                       and int(s) in (0, 1) for s in issame)):
        raise BadInputError(f"{path}: issame must be a flat list of booleans (0/1)")
    same = np.asarray([bool(s) for s in issame], dtype=bool)
    if len(bins) < 2 * same.size:
        raise BadInputError(f"{path}: {same.size} pairs need {2 * same.size} images, found {len(bins)}")
    images = []
    for i in range(2 * same.size):
        b = bins[i]
        if isinstance(b, np.ndarray):
            b = b.tobytes()
        if not isinstance(b, (bytes, bytearray)):
            raise BadInputError(f"{path}: image {i} is a {type(b).__name__}, not encoded bytes")
        images.append(bytes(b))
    return images, same


def save_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write an insightface-style ``.bin`` (pickle protocol 4; repeated bytes objects stored once)."""
    with open(path, "wb") as f:
        pickle.dump((list(images), [bool(s) for s in issame]), f, protocol=4)


# ----------------------------------------------------------------------------- pairs.txt sets


@dataclasses.dataclass(frozen=True)
class Pair:
    """One line of a pairs file: two image paths (relative to the image root) and the label."""

    path1: str
    path2: str
    issame: bool
    line: int


def read_pairs(pairs_path: str | os.PathLike, ext: str = "jpg") -> list[Pair]:
    """Parse an LFW-style pairs file.

    Lines ``name i j`` (same person) or ``name1 i name2 j`` (different); image
    ``name/name_%04d.<ext>``. A first line of integers only (``10 300``, ``500``) is a header.
    Raises BadInputError naming the file and line of a malformed row.
    """
    pairs_path = os.fspath(pairs_path)
    out = []
    with open(pairs_path, "r", encoding="utf-8") as f:
        for line_no, raw in enumerate(f, 1):
            parts = raw.split()
            if not parts:
                continue
            if line_no == 1 and all(p.isdigit() for p in parts):
                continue
            try:
                if len(parts) == 3:
                    n, i, j = parts[0], int(parts[1]), int(parts[2])
                    out.append(Pair(f"{n}/{n}_{i:04d}.{ext}", f"{n}/{n}_{j:04d}.{ext}", True, line_no))
                elif len(parts) == 4:
                    n1, i, n2, j = parts[0], int(parts[1]), parts[2], int(parts[3])
                    out.append(Pair(f"{n1}/{n1}_{i:04d}.{ext}", f"{n2}/{n2}_{j:04d}.{ext}", False, line_no))
                else:
                    raise ValueError(f"expected 3 or 4 fields, got {len(parts)}")
            except ValueError as e:
                raise BadInputError(f"{pairs_path} line {line_no}: {e}: {raw.rstrip()!r}") from None
    if not out:
        raise BadInputError(f"{pairs_path}: no pairs")
    return out


# ----------------------------------------------------------------------------- decoding


def _decode(src: bytes | str, what: str, matrix=None, size_hw=None) -> np.ndarray:
    """``image_io.decode_rgb`` (the decoder training uses too), then the optional alignment warp."""
    try:
        img = image_io.decode_rgb(src, what, expect_hw=size_hw if matrix is None else None)
    except image_io.ImageDecodeError as e:
        raise BadInputError(str(e)) from None
    if matrix is not None:
        return align.warp_affine(img, matrix, size_hw)
    return img


def _decode_many(sources: Sequence[bytes | str], names: Sequence[str], matrices, size_hw, threads, skip_bad):
    """-> (list of uint8 (H, W, 3) or None where bad, problems): ``decode_images`` without the stacking."""
    n = len(sources)

    def work(i):
        m = None if matrices is None else matrices[i]
        img = _decode(sources[i], names[i], m, size_hw)
        if size_hw is not None and img.shape[:2] != tuple(size_hw):
            raise BadInputError(f"{names[i]}: image is {img.shape[1]}x{img.shape[0]} (WxH), "
                                f"expected {size_hw[1]}x{size_hw[0]}")
        return img

    results: list[Any] = [None] * n
    problems = []
    with concurrent.futures.ThreadPoolExecutor(threads or min(32, (os.cpu_count() or 1) + 2)) as ex:
        futs = {ex.submit(work, i): i for i in range(n)}
        for fut in concurrent.futures.as_completed(futs):
            i = futs[fut]
            try:
                results[i] = fut.result()
            except BadInputError as e:
                if not skip_bad:
                    for other in futs:
                        other.cancel()
                    raise
                problems.append(str(e))
    return results, problems


def _check_same_shape(results, names, shape=None):
    """The shape every decoded image shares (``shape`` if given); BadInputError naming the first that differs."""
    for i, r in enumerate(results):
        if r is None:
            continue
        if shape is None:
            shape = r.shape
        elif r.shape != shape:
            raise BadInputError(f"{names[i]}: image shape {r.shape} differs from the others' {shape}")
    return shape


def _names(sources, names):
    return list(names) if names is not None else [s if isinstance(s, str) else f"image {i}"
                                                  for i, s in enumerate(sources)]


def decode_images(sources: Sequence[bytes | str], *, names: Sequence[str] | None = None,
                  matrices: Sequence[np.ndarray] | None = None, size_hw: tuple[int, int] | None = None,
                  threads: int | None = None, skip_bad: bool = False):
    """Decode (and optionally warp) images in a thread pool.

    Args:
      sources: encoded bytes or file paths.
      names: how to name each in errors (default: the path, or "image i").
      matrices: per-image (2, 3) alignment matrices (with ``size_hw``).
      size_hw: the size every output must have (alignment output size, or a check).
    Returns:
      (images uint8 (N, H, W, 3) with zeros where bad, ok (N,) bool, problems list).
    Raises:
      BadInputError naming the first bad image (unless ``skip_bad``).
    """
    n = len(sources)
    names = _names(sources, names)
    results, problems = _decode_many(sources, names, matrices, size_hw, threads, skip_bad)
    ok = np.array([r is not None for r in results])
    if not ok.any():
        raise BadInputError("no image could be decoded")
    shape = _check_same_shape(results, names)
    out = np.zeros((n,) + shape, np.uint8)
    for i, r in enumerate(results):
        if r is not None:
            out[i] = r
    return out, ok, sorted(problems)


CHECK_CHUNK = 512  # images decoded at a time when a lazy set is checked at load


class LazyImages:
    """Encoded images (bytes or paths) decoded a slice at a time: what a set loaded with ``lazy=True`` holds.

    A verification set of ~14,000 images (insightface's ``cfp_fp.bin``: 14,000 at
    112x112, 527 MB decoded) then keeps only its encoded bytes; :func:`~ppfr_jax.evaluate.embedding.embed`
    decodes ``decode(i, j)`` for each batch it embeds (threaded, ``decode_images``).
    Every image was decoded once when the set was loaded (:meth:`check`), so a bad
    one is reported then, naming it, and not in the middle of training; files are read
    into memory then (encoded), so a file moved or changed later does not matter. An image
    that failed under ``skip_bad`` decodes as zeros, as in :func:`decode_images`.

    ``len()``; ``shape`` (N, H, W, 3); ``take(indices)`` a re-indexed view (nothing
    decoded); ``transformed(fn, image_shape)`` a view whose decoded batches go through ``fn``;
    ``decode(i, j)`` uint8 (j - i, H, W, 3); ``np.asarray(lazy)`` decodes all.
    """

    def __init__(self, sources: Sequence[bytes | str], names: Sequence[str], image_shape: tuple[int, ...], *,
                 matrices: Sequence[np.ndarray] | None = None, size_hw: tuple[int, int] | None = None,
                 threads: int | None = None, indices: np.ndarray | None = None, transform=None,
                 ok: np.ndarray | None = None, raw_shape: tuple[int, ...] | None = None):
        self._sources, self._names, self._matrices = sources, names, matrices
        self._ok = np.ones(len(sources), bool) if ok is None else np.asarray(ok, bool)
        self._size_hw, self._threads, self._transform = size_hw, threads, transform
        self.image_shape = tuple(image_shape)
        self._raw_shape = tuple(image_shape) if raw_shape is None else tuple(raw_shape)  # as decoded
        self._indices = np.arange(len(sources)) if indices is None else np.asarray(indices, np.int64)

    @classmethod
    def check(cls, sources, names, *, matrices=None, size_hw=None, threads=None, skip_bad=False):
        """Decode every source once (``CHECK_CHUNK`` at a time, none kept) -> (LazyImages, ok (N,) bool, problems).

        Raises BadInputError as ``decode_images`` does (unless ``skip_bad``), and for a file
        that cannot be read.
        """
        sources = list(sources)
        for i, src in enumerate(sources):
            if isinstance(src, str):  # kept encoded in memory: a later change to the file cannot stop a run
                try:
                    sources[i] = pathlib.Path(src).read_bytes()
                except OSError as e:
                    raise BadInputError(f"{names[i]}: cannot read it ({type(e).__name__}: {e.strerror or e})") from None
        n = len(sources)
        ok = np.zeros(n, bool)
        problems: list[str] = []
        shape = None
        for lo in range(0, n, CHECK_CHUNK):
            hi = min(n, lo + CHECK_CHUNK)
            res, probs = _decode_many(sources[lo:hi], names[lo:hi],
                                      None if matrices is None else matrices[lo:hi], size_hw, threads, skip_bad)
            shape = _check_same_shape(res, names[lo:hi], shape)
            ok[lo:hi] = [r is not None for r in res]
            problems += probs
        if not ok.any():
            raise BadInputError("no image could be decoded")
        return (cls(sources, names, shape, matrices=matrices, size_hw=size_hw, threads=threads, ok=ok), ok,
                sorted(problems))

    def __len__(self) -> int:
        return int(self._indices.size)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self),) + self.image_shape

    @property
    def dtype(self):
        return np.dtype(np.uint8)

    def _view(self, **over) -> "LazyImages":
        kw = dict(matrices=self._matrices, size_hw=self._size_hw, threads=self._threads, indices=self._indices,
                  transform=self._transform, ok=self._ok, raw_shape=self._raw_shape)
        shape = over.pop("image_shape", self.image_shape)
        return LazyImages(self._sources, self._names, shape, **{**kw, **over})

    def take(self, indices) -> "LazyImages":
        """The images at ``indices`` (into this view), still encoded."""
        return self._view(indices=self._indices[np.asarray(indices)])

    def transformed(self, fn, image_shape: tuple[int, ...]) -> "LazyImages":
        """A view whose decoded batches (k, H, W, 3) become ``fn(batch)`` of per-image shape ``image_shape``."""
        prev = self._transform
        return self._view(transform=fn if prev is None else (lambda x: fn(prev(x))), image_shape=image_shape)

    def decode(self, start: int, stop: int) -> np.ndarray:
        """uint8 (k, H, W, 3): images ``start:stop`` of this view, decoded now (zeros for one skipped at load).

        Raises BadInputError naming an image whose shape differs from the set's.
        """
        idx = self._indices[start:stop]
        if idx.size == 0:
            return np.zeros((0,) + self.image_shape, np.uint8)
        good = idx[self._ok[idx]]
        res, _ = _decode_many([self._sources[i] for i in good], [self._names[i] for i in good],
                              None if self._matrices is None else [self._matrices[i] for i in good],
                              self._size_hw, self._threads, False)
        out = np.zeros((idx.size,) + self._raw_shape, np.uint8)
        for k, r in zip(np.flatnonzero(self._ok[idx]), res):
            if r.shape != self._raw_shape:
                raise BadInputError(f"{self._names[idx[k]]}: image shape {r.shape} differs from the others' "
                                    f"{self._raw_shape}")
            out[k] = r
        out = out if self._transform is None else self._transform(out)
        if out.shape[1:] != self.image_shape:
            raise ValueError(f"LazyImages: the transform gave {out.shape[1:]}, not the declared {self.image_shape}")
        return out

    def __array__(self, dtype=None, copy=None):
        out = self.decode(0, len(self))
        return out if dtype is None else out.astype(dtype)


@dataclasses.dataclass
class VerificationSet:
    """Decoded verification data.

    Attributes:
      images: (M, H, W, 3) uint8 distinct images, or :class:`LazyImages` (``lazy=True``: still encoded).
      pairs: (P, 2) int rows into ``images``.
      issame: (P,) bool.
      name: where it came from.
      skipped: problems skipped with ``skip_bad`` (pairs dropped).
      landmarks: optional (M, K, 2) normalised landmarks.
    """

    images: np.ndarray | LazyImages
    pairs: np.ndarray
    issame: np.ndarray
    name: str
    skipped: list[str] = dataclasses.field(default_factory=list)
    landmarks: np.ndarray | None = None

    def interleaved(self) -> tuple[np.ndarray, np.ndarray]:
        """-> (images (2P, H, W, 3) in pair order, issame (P,)); a lazy set gives a :class:`LazyImages` view."""
        if isinstance(self.images, LazyImages):
            return self.images.take(self.pairs.reshape(-1)), self.issame
        return self.images[self.pairs.reshape(-1)], self.issame


def load_bin_set(path: str | os.PathLike, *, skip_bad: bool = False, threads: int | None = None,
                 lazy: bool = False) -> VerificationSet:
    """A ``.bin`` as a :class:`VerificationSet` (repeated images decoded once; ``lazy``: kept encoded)."""
    path = os.fspath(path)
    blobs, same = load_bin(path)
    uniq: dict[bytes, int] = {}
    idx = np.array([uniq.setdefault(b, len(uniq)) for b in blobs], np.int64)
    first = {}
    for i, u in enumerate(idx):
        first.setdefault(int(u), i)
    srcs = list(uniq)
    names = [f"{path}: image {first[u]}" for u in range(len(srcs))]
    if lazy:
        images, ok, problems = LazyImages.check(srcs, names, threads=threads, skip_bad=skip_bad)
    else:
        images, ok, problems = decode_images(srcs, names=names, threads=threads, skip_bad=skip_bad)
    pairs = idx.reshape(-1, 2)
    keep = ok[pairs].all(1)
    return VerificationSet(images, pairs[keep], same[keep], path, problems)


def load_pairs_set(pairs_path: str | os.PathLike, image_root: str | os.PathLike, *,
                   landmarks: str | os.PathLike | dict | None = None, template: str = "arcface",
                   skip_bad: bool = False, threads: int | None = None, ext: str = "jpg",
                   lazy: bool = False) -> VerificationSet:
    """An LFW-style pairs file over an image folder, optionally aligned (``lazy``: decoded when embedded).

    Args:
      landmarks: 5-point table (path or dict, see ``align.read_landmarks_tsv``);
        each image is then aligned to ``template`` (an image without a row is an error).
        Without it the images must already be aligned crops of one size.
    Raises:
      BadInputError naming the pairs file and line for a missing image, or the
      image for an undecodable one (``skip_bad=True``: such pairs are dropped and listed).
    """
    pairs_path = os.fspath(pairs_path)
    root = os.fspath(image_root)
    plist = read_pairs(pairs_path, ext)
    index: dict[str, int] = {}
    where: dict[str, str] = {}
    rows, same, skipped = [], [], []
    for p in plist:
        bad = [q for q in (p.path1, p.path2) if not os.path.isfile(os.path.join(root, q))]
        if bad:
            msg = f"{pairs_path} line {p.line}: image {os.path.join(root, bad[0])} not found"
            if not skip_bad:
                raise BadInputError(msg + " (pass skip_bad=True to drop such pairs)")
            skipped.append(msg)
            continue
        for q in (p.path1, p.path2):
            if q not in index:
                index[q] = len(index)
                where[q] = f"{os.path.join(root, q)} ({pairs_path} line {p.line})"
        rows.append((index[p.path1], index[p.path2]))
        same.append(p.issame)
    paths = list(index)
    matrices, size = None, None
    if landmarks is not None:
        table = landmarks if isinstance(landmarks, dict) else align.read_landmarks_tsv(landmarks)
        lookup = align.LandmarkLookup(table)
        _, size = align.template(template)
        matrices = []
        for q in paths:
            lm = lookup.get(q)
            if lm is None:
                raise BadInputError(f"{where[q]}: no 5-point landmarks for it in {landmarks}")
            matrices.append(align.estimate_alignment(lm, template))
    files, names = [os.path.join(root, q) for q in paths], [where[q] for q in paths]
    if lazy:
        images, ok, problems = LazyImages.check(files, names, matrices=matrices, size_hw=size, threads=threads,
                                                skip_bad=skip_bad)
    else:
        images, ok, problems = decode_images(files, names=names, matrices=matrices, size_hw=size, threads=threads,
                                             skip_bad=skip_bad)
    pairs = np.asarray(rows, np.int64).reshape(-1, 2)
    same_arr = np.asarray(same, bool)
    keep = ok[pairs].all(1) if len(pairs) else np.zeros(0, bool)
    return VerificationSet(images, pairs[keep], same_arr[keep], pairs_path, skipped + problems)



def load_set(spec: str, *, image_root: str | None = None, landmarks: str | None = None,
             template: str = "arcface", skip_bad: bool = False, lazy: bool = False) -> VerificationSet:
    """``"demo"`` | ``path.bin`` | ``pairs.txt`` -> :class:`VerificationSet` (``.interleaved()``: the pair-order images).

    For a pairs file, ``image_root`` defaults to a sibling ``lfw-deepfunneled``
    or ``lfw`` folder of the pairs file; ``landmarks`` / ``template`` align it
    (see :func:`load_pairs_set`). ``lazy``: the images stay encoded until embedded
    (:class:`LazyImages`; each is decoded once here to check it).
    """
    if spec == "demo":
        p = demo_paths()
        vs = load_bin_set(p["eval_bin"], skip_bad=skip_bad, lazy=lazy)
        vs.name = "demo (LFW pairsDevTest)"
        return vs
    if spec.endswith(".bin"):
        return load_bin_set(spec, skip_bad=skip_bad, lazy=lazy)
    if image_root is None:
        base = pathlib.Path(spec).parent
        cands = [base / "lfw-deepfunneled", base / "lfw"]
        found = [c for c in cands if c.is_dir()]
        if not found:
            raise BadInputError(f"{spec}: no image root given and none of {[str(c) for c in cands]} exists")
        image_root = str(found[0])
    return load_pairs_set(spec, image_root, landmarks=landmarks, template=template, skip_bad=skip_bad, lazy=lazy)


def demo_eval_landmarks() -> np.ndarray:
    """(2P, 98, 2) float32 normalised landmarks of the demo verification images (pair order)."""
    z = safe_npz.load_npz(demo_paths()["eval_landmarks"], error=BadInputError, names=("landmarks",))
    return np.asarray(z["landmarks"], np.float32)
