"""Face verification: embeddings, the 10-fold protocol, TPR@FPR, verification-set readers, ``ppfr-eval``.

No TensorFlow here (images are decoded with PIL), so evaluation runs where
only jax is installed.

Protocol (TFace ``test/utils.py:evaluate`` / insightface ``verification.py``):
embeddings are L2-normalised, pair ``i`` is rows ``2i`` and ``2i+1``, its
distance is the squared L2 distance (``2 - 2 cos``), a pair is predicted
"same" when ``dist < threshold``. The pairs are cut into 10 consecutive folds
(``KFold(10, shuffle=False)``); for each fold the threshold of
``np.arange(0, 4, 0.01)`` with the best accuracy on the other nine (first
argmax) is applied to it. Reported: mean and std (ddof 0) of the 10 fold
accuracies. On LFW ``pairs.txt`` (10 x 600 pairs in file order) the folds
are the official View 2 folds.

Verification sets:

- insightface ``.bin`` (lfw.bin, cfp_fp.bin, agedb_30.bin, calfw.bin,
  cplfw.bin; the embedded demo set): a pickle of (list of encoded images,
  list of issame), read by :func:`load_bin` with an unpickler that builds
  only bytes/containers/bools (never code);
- LFW-style ``pairs.txt`` over an image folder (:func:`read_pairs`), aligned
  on the fly from a 5-point landmark table when one is given.

``ppfr-eval`` (see :func:`main`) evaluates a recogniser named by ``--model``;
:data:`MODELS` is the hook where new model kinds (trained ppfr workdirs)
plug in with :func:`register_model`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import pickle
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from ppfr_jax import align, image_io, safe_npz, safe_pickle
from ppfr_jax.errors import PpfrError

THRESHOLDS = np.arange(0, 4, 0.01)


class BadInputError(PpfrError, ValueError):
    """An evaluation input (pairs line, image, .bin) is unusable; the message names it."""


# ----------------------------------------------------------------------------- protocol


def kfold_splits(n: int, n_folds: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """Consecutive folds as sklearn's ``KFold(n_folds, shuffle=False)``: -> [(train idx, test idx)].

    The first ``n % n_folds`` folds get one extra element.
    """
    if not 2 <= n_folds <= n:
        raise ValueError(f"need 2 <= n_folds <= n, got n_folds={n_folds}, n={n}")
    sizes = np.full(n_folds, n // n_folds, np.int64)
    sizes[: n % n_folds] += 1
    idx = np.arange(n)
    out, start = [], 0
    for s in sizes:
        test = idx[start:start + s]
        out.append((np.concatenate([idx[:start], idx[start + s:]]), test))
        start += s
    return out


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by their L2 norm (in the input's float dtype)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    n = np.sqrt(np.sum(np.square(x), axis=axis, keepdims=True))
    return x / np.maximum(n, eps).astype(x.dtype)


def _counts(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray):
    """For every threshold: (tp, fp, tn, fn) of ``dist < threshold`` (sorted search, O(n log n))."""
    pos = np.sort(dist[same])
    neg = np.sort(dist[~same])
    tp = np.searchsorted(pos, thresholds, side="left")
    fp = np.searchsorted(neg, thresholds, side="left")
    return tp, fp, neg.size - fp, pos.size - tp


def _rates(tp, fp, tn, fn, n):
    tpr = np.where(tp + fn == 0, 0.0, tp / np.maximum(tp + fn, 1))
    fpr = np.where(fp + tn == 0, 0.0, fp / np.maximum(fp + tn, 1))
    acc = (tp + tn) / n
    return tpr, fpr, acc


def calculate_roc(thresholds: np.ndarray, embeddings1: np.ndarray, embeddings2: np.ndarray,
                  actual_issame: np.ndarray, nrof_folds: int = 10):
    """The fold protocol on two aligned embedding sets (no normalisation here).

    Args:
      thresholds: (T,) squared-distance thresholds.
      embeddings1, embeddings2: (P, D) embeddings of each pair's two images.
      actual_issame: (P,) bool.
    Returns:
      (tpr (T,), fpr (T,)) means over folds of the test-fold rates, accuracy (F,),
      best_thresholds (F,), bad_case (list of same-pair indices rejected at their
      fold's threshold), dist (P,) in the embeddings' dtype.
    """
    e1, e2 = np.asarray(embeddings1), np.asarray(embeddings2)
    same = np.asarray(actual_issame, bool)
    if e1.shape != e2.shape or e1.ndim != 2 or same.shape != (e1.shape[0],):
        raise ValueError(f"calculate_roc: shapes {e1.shape}, {e2.shape}, issame {same.shape} do not match")
    thresholds = np.asarray(thresholds, np.float64)
    dist = np.sum(np.square(np.subtract(e1, e2)), axis=1)
    # Compared in float64 (exact for float32 distances); the reference compares numpy
    # float32 with float64 scalars, which numpy may do in either precision -- the results
    # only differ for a distance within float32 rounding of a threshold.
    d64 = dist.astype(np.float64)
    n_folds = nrof_folds
    tprs = np.zeros((n_folds, thresholds.size))
    fprs = np.zeros((n_folds, thresholds.size))
    accuracy = np.zeros(n_folds)
    best = np.zeros(n_folds)
    bad_case = []
    for f, (train, test) in enumerate(kfold_splits(len(d64), n_folds)):
        _, _, acc_train = _rates(*_counts(d64[train], same[train], thresholds), train.size)
        bi = int(np.argmax(acc_train))
        best[f] = thresholds[bi]
        tprs[f], fprs[f], _ = _rates(*_counts(d64[test], same[test], thresholds), test.size)
        _, _, acc = _rates(*_counts(d64[test], same[test], thresholds[bi:bi + 1]), test.size)
        accuracy[f] = acc[0]
        bad_case.extend(int(i) for i in test if same[i] and d64[i] > thresholds[bi])
    return tprs.mean(0), fprs.mean(0), accuracy, best, bad_case, dist


def roc_curve(scores: np.ndarray, labels: np.ndarray):
    """Full ROC of "same if score >= t" over every distinct score (higher score = more similar).

    Returns:
      fpr, tpr, thresholds: (K+1,) each, thresholds decreasing, starting at +inf
      (fpr = tpr = 0), as ``sklearn.metrics.roc_curve(drop_intermediate=False)``.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    npos, nneg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fp / nneg]
    tpr = np.r_[0.0, tp / npos]
    return fpr, tpr, np.r_[np.inf, s[last]]


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, targets: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1)):
    """TPR at given FPRs, as insightface/TFace IJB evaluation reads it off the ROC.

    The ROC point whose FPR is nearest to the target; among points with the
    same FPR the one with the highest TPR (what their
    ``min(zip(|fpr - x|, index))`` over the reversed sklearn curve picks).
    Scores: higher = more similar (use ``-dist``).

    Returns:
      {target: tpr}.
    """
    fpr, tpr, _ = roc_curve(scores, labels)
    fpr_r, tpr_r = fpr[::-1], tpr[::-1]
    out = {}
    for x in targets:
        out[float(x)] = float(tpr_r[int(np.argmin(np.abs(fpr_r - x)))])
    return out


def verify(embeddings: np.ndarray, issame: Sequence[bool], *, nrof_folds: int = 10,
           thresholds: np.ndarray | None = None, normalize: bool = True,
           fpr_targets: Sequence[float] = (1e-3, 1e-2, 1e-1)) -> dict[str, Any]:
    """Evaluate interleaved pair embeddings with the 10-fold protocol.

    Args:
      embeddings: (2P, D); rows 2i and 2i+1 are pair i.
      issame: (P,) bool.
      normalize: L2-normalise rows first (the protocol's distances assume unit vectors).
    Returns:
      dict: ``accuracy_mean``, ``accuracy_std`` (ddof 0), ``accuracy`` (F,),
      ``best_thresholds`` (F,), ``tpr``/``fpr`` (T,) fold-mean ROC at ``thresholds``,
      ``dist`` (P,), ``bad_case``, ``tpr_at_fpr`` {fpr: tpr} over all pairs.
    """
    emb = np.asarray(embeddings)
    same = np.asarray(issame, bool)
    if emb.ndim != 2 or emb.shape[0] != 2 * same.shape[0]:
        raise ValueError(f"verify: need (2P, D) embeddings for P={same.shape[0]} pairs, got {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("verify: embeddings contain NaN or inf")
    if normalize:
        emb = l2_normalize(emb)
    thr = THRESHOLDS if thresholds is None else np.asarray(thresholds, np.float64)
    tpr, fpr, acc, best, bad, dist = calculate_roc(thr, emb[0::2], emb[1::2], same, nrof_folds)
    return {
        "accuracy_mean": float(np.mean(acc)), "accuracy_std": float(np.std(acc)), "accuracy": acc,
        "best_thresholds": best, "tpr": tpr, "fpr": fpr, "thresholds": thr, "dist": dist,
        "bad_case": np.asarray(bad, np.int64), "tpr_at_fpr": tpr_at_fpr(-dist, same, fpr_targets),
    }


# ----------------------------------------------------------------------------- embeddings


def embed(apply_fn: Callable, images: np.ndarray, *, batch_size: int = 128, flip: str | None = None,
          preprocess: Callable | None = None) -> np.ndarray:
    """Embeddings of a uint8 image array, in fixed-size jitted batches.

    Args:
      apply_fn: (B, H, W, 3) model input -> (B, D). Jitted here (one compile:
        the last batch is padded).
      images: (N, H, W, 3) uint8 (or float already in the model's input range).
      flip: None; "sum" (f(x) + f(flip(x)), TFace/insightface); "concat"
        ([f(x), f(flip(x))], the CASIA MobileFaceNet evaluation).
      preprocess: applied to each batch inside the jit (e.g. uint8 -> [-1, 1]).
    Returns:
      (N, D) or (N, 2D) float32 numpy, not normalised.
    """
    import jax
    import jax.numpy as jnp

    if flip not in (None, "none", "sum", "concat"):
        raise ValueError(f"flip must be None, 'sum' or 'concat', got {flip!r}")
    prep = preprocess if preprocess is not None else (lambda x: x)

    @jax.jit
    def run(x):
        x = prep(x)
        if flip in (None, "none"):
            return apply_fn(x).astype(jnp.float32)
        n = x.shape[0]
        e = apply_fn(jnp.concatenate([x, x[:, :, ::-1, :]], axis=0)).astype(jnp.float32)
        return e[:n] + e[n:] if flip == "sum" else jnp.concatenate([e[:n], e[n:]], axis=-1)

    images = np.asarray(images)
    n = images.shape[0]
    if n == 0:
        raise ValueError("embed: no images")
    bs = min(batch_size, n)
    outs = []
    pending = None
    for i in range(0, n, bs):
        chunk = images[i:i + bs]
        if chunk.shape[0] < bs:
            chunk = np.concatenate([chunk, np.zeros((bs - chunk.shape[0],) + chunk.shape[1:], chunk.dtype)])
        res = run(chunk)  # dispatched asynchronously; the previous batch is fetched meanwhile
        if pending is not None:
            outs.append(np.asarray(pending))
        pending = res
    outs.append(np.asarray(pending))
    return np.concatenate(outs)[:n]


# ----------------------------------------------------------------------------- .bin sets


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
    names = list(names) if names is not None else [s if isinstance(s, str) else f"image {i}"
                                                   for i, s in enumerate(sources)]

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
    ok = np.array([r is not None for r in results])
    if not ok.any():
        raise BadInputError("no image could be decoded")
    shape = next(r.shape for r in results if r is not None)
    for i, r in enumerate(results):
        if r is not None and r.shape != shape:
            raise BadInputError(f"{names[i]}: image shape {r.shape} differs from the others' {shape}")
    out = np.zeros((n,) + shape, np.uint8)
    for i, r in enumerate(results):
        if r is not None:
            out[i] = r
    return out, ok, sorted(problems)


@dataclasses.dataclass
class VerificationSet:
    """Decoded verification data.

    Attributes:
      images: (M, H, W, 3) uint8 distinct images.
      pairs: (P, 2) int rows into ``images``.
      issame: (P,) bool.
      name: where it came from.
      skipped: problems skipped with ``skip_bad`` (pairs dropped).
      landmarks: optional (M, K, 2) normalised landmarks.
    """

    images: np.ndarray
    pairs: np.ndarray
    issame: np.ndarray
    name: str
    skipped: list[str] = dataclasses.field(default_factory=list)
    landmarks: np.ndarray | None = None

    def interleaved(self) -> tuple[np.ndarray, np.ndarray]:
        """-> (images (2P, H, W, 3) in pair order, issame (P,))."""
        return self.images[self.pairs.reshape(-1)], self.issame


def load_bin_set(path: str | os.PathLike, *, skip_bad: bool = False, threads: int | None = None) -> VerificationSet:
    """A ``.bin`` as a :class:`VerificationSet` (repeated images decoded once)."""
    path = os.fspath(path)
    blobs, same = load_bin(path)
    uniq: dict[bytes, int] = {}
    idx = np.array([uniq.setdefault(b, len(uniq)) for b in blobs], np.int64)
    first = {}
    for i, u in enumerate(idx):
        first.setdefault(int(u), i)
    srcs = list(uniq)
    names = [f"{path}: image {first[u]}" for u in range(len(srcs))]
    images, ok, problems = decode_images(srcs, names=names, threads=threads, skip_bad=skip_bad)
    pairs = idx.reshape(-1, 2)
    keep = ok[pairs].all(1)
    return VerificationSet(images, pairs[keep], same[keep], path, problems)


def load_pairs_set(pairs_path: str | os.PathLike, image_root: str | os.PathLike, *,
                   landmarks: str | os.PathLike | dict | None = None, template: str = "arcface",
                   skip_bad: bool = False, threads: int | None = None, ext: str = "jpg") -> VerificationSet:
    """An LFW-style pairs file over an image folder, optionally aligned.

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
    images, ok, problems = decode_images([os.path.join(root, q) for q in paths], names=[where[q] for q in paths],
                                         matrices=matrices, size_hw=size, threads=threads, skip_bad=skip_bad)
    pairs = np.asarray(rows, np.int64).reshape(-1, 2)
    same_arr = np.asarray(same, bool)
    keep = ok[pairs].all(1) if len(pairs) else np.zeros(0, bool)
    return VerificationSet(images, pairs[keep], same_arr[keep], pairs_path, skipped + problems)


def load_verification_set(spec: str, *, image_root: str | None = None, landmarks: str | None = None,
                          template: str = "arcface", skip_bad: bool = False):
    """``"demo"`` | ``path.bin`` | ``pairs.txt`` -> (images uint8 (2P, H, W, 3) in pair order, issame (P,)).

    For a pairs file, ``image_root`` defaults to a sibling ``lfw-deepfunneled``
    or ``lfw`` folder of the pairs file.
    """
    vs = load_set(spec, image_root=image_root, landmarks=landmarks, template=template, skip_bad=skip_bad)
    return vs.interleaved()


def load_set(spec: str, *, image_root: str | None = None, landmarks: str | None = None,
             template: str = "arcface", skip_bad: bool = False) -> VerificationSet:
    """Like :func:`load_verification_set`, returning the :class:`VerificationSet`."""
    if spec == "demo":
        from ppfr_jax.demo_data import demo_paths
        p = demo_paths()
        vs = load_bin_set(p["eval_bin"], skip_bad=skip_bad)
        vs.name = "demo (LFW pairsDevTest)"
        return vs
    if spec.endswith(".bin"):
        return load_bin_set(spec, skip_bad=skip_bad)
    if image_root is None:
        base = pathlib.Path(spec).parent
        cands = [base / "lfw-deepfunneled", base / "lfw"]
        found = [c for c in cands if c.is_dir()]
        if not found:
            raise BadInputError(f"{spec}: no image root given and none of {[str(c) for c in cands]} exists")
        image_root = str(found[0])
    return load_pairs_set(spec, image_root, landmarks=landmarks, template=template, skip_bad=skip_bad)


def demo_eval_landmarks() -> np.ndarray:
    """(2P, 98, 2) float32 normalised landmarks of the demo verification images (pair order)."""
    from ppfr_jax.demo_data import demo_paths
    z = safe_npz.load_npz(demo_paths()["eval_landmarks"], error=BadInputError, names=("landmarks",))
    return np.asarray(z["landmarks"], np.float32)


# ----------------------------------------------------------------------------- models (the plug-in hook)


@dataclasses.dataclass
class Recognizer:
    """What ``ppfr-eval`` needs from a model.

    Attributes:
      apply_fn: jittable (B, H, W, 3) preprocessed input -> (B, D) embeddings.
      preprocess: jittable uint8 (B, H, W, 3) -> model input.
      input_hw: (H, W) the model takes.
      template: alignment template its training data used (``ppfr_jax.align.TEMPLATES``).
      flip: default flip fusion ("sum", "concat" or None).
    """

    apply_fn: Callable
    preprocess: Callable
    input_hw: tuple[int, int]
    template: str = "arcface"
    flip: str | None = "sum"


MODELS: dict[str, Callable[[str], Recognizer]] = {}


def register_model(name: str):
    """Decorator: ``@register_model("x") def load(checkpoint: str) -> Recognizer``; ``--model x`` uses it."""
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


@register_model("casia_mobilefacenet")
def _load_casia_mobilefacenet(checkpoint: str) -> Recognizer:
    from ppfr_jax.models import mobilefacenet_casia as mc
    model, variables = mc.load_casia_mobilefacenet(checkpoint)
    return Recognizer(apply_fn=lambda x: model.apply(variables, x, train=False), preprocess=mc.preprocess,
                      input_hw=tuple(mc.INPUT_HW), template="sphereface", flip="concat")


@register_model("ppfr")
def _load_ppfr_workdir(checkpoint: str) -> Recognizer:
    """A ppfr_jax training workdir (``--checkpoint runs/x``): the task's own verification embedding.

    DuetFace embeds through client + server, MinusFace stage 2 through protect +
    recognize (``task.embed``), as the training run's DevTest evaluation does.
    """
    from ppfr_jax import methods  # no TensorFlow: the model core imports without it

    if not os.path.isdir(checkpoint) and "://" not in checkpoint:
        raise FileNotFoundError(f"--checkpoint {checkpoint!r}: not a directory (a ppfr_jax training workdir)")
    task, variables, step = methods.load_for_inference(checkpoint)
    print(f"{checkpoint}: task {task.config.task}, checkpoint of step {step}")
    flip = "sum" if task.config.eval.get("flip", True) else None
    return Recognizer(apply_fn=lambda x: task.embed(variables, x), preprocess=lambda x: x, input_hw=(112, 112),
                      template="arcface", flip=flip)


def fit_to_input(images: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    """Adapt aligned crops to a model's input size without resampling.

    ArcFace 112x112 crops -> SphereFace 112x96 by dropping 8 columns each side
    (the two templates differ by exactly that shift).
    """
    hw = tuple(images.shape[1:3])
    if hw == tuple(input_hw):
        return images
    if hw == (112, 112) and tuple(input_hw) == (112, 96):
        return images[:, :, 8:104]
    raise BadInputError(f"images are {hw[0]}x{hw[1]} (HxW) but the model takes "
                        f"{input_hw[0]}x{input_hw[1]}; align them with the model's template")


def evaluate_set(rec: Recognizer, vs: VerificationSet, *, batch_size: int = 128, flip: str | None = None,
                 nrof_folds: int = 10) -> dict[str, Any]:
    """Embed the distinct images of a set once and run :func:`verify` on its pairs."""
    images = fit_to_input(vs.images, rec.input_hw)
    emb = embed(rec.apply_fn, images, batch_size=batch_size, flip=flip, preprocess=rec.preprocess)
    res = verify(emb[vs.pairs.reshape(-1)], vs.issame, nrof_folds=nrof_folds)
    res["num_pairs"] = int(vs.issame.size)
    res["skipped"] = list(vs.skipped)
    return res


def main(argv: list[str] | None = None) -> int:
    """``ppfr-eval``: verification accuracy of a recogniser on pairs files / .bin sets."""
    p = argparse.ArgumentParser(prog="ppfr-eval", description=main.__doc__)
    p.add_argument("--model", default="casia_mobilefacenet", help=f"one of {sorted(MODELS)}")
    p.add_argument("--checkpoint", required=True, help="weights file (068.ckpt) or workdir")
    p.add_argument("--pairs", action="append", required=True,
                   help="pairs.txt, an insightface .bin, or 'demo'; repeatable")
    p.add_argument("--images", default=None, help="image root for a pairs.txt (default: sibling lfw-deepfunneled/)")
    p.add_argument("--landmarks", default=None,
                   help="5-point TSV to align pairs.txt images (default: sibling derived/lfw-deepfunneled_5pt.tsv "
                        "when it exists; 'none' to use the images as they are)")
    p.add_argument("--template", default=None, help="alignment template (default: the model's)")
    p.add_argument("--flip", default=None, choices=["none", "sum", "concat"], help="default: the model's")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--skip-bad", action="store_true", help="drop pairs with missing/corrupt images (counted)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if a.model not in MODELS:
        p.error(f"unknown --model {a.model!r}; known: {sorted(MODELS)}")
    rec = MODELS[a.model](a.checkpoint)
    flip = rec.flip if a.flip is None else (None if a.flip == "none" else a.flip)
    template = a.template or rec.template
    results = {}
    for spec in a.pairs:
        t0 = time.time()
        lm = a.landmarks
        if lm is None and spec != "demo" and not spec.endswith(".bin"):
            cand = pathlib.Path(spec).parent / "derived" / "lfw-deepfunneled_5pt.tsv"
            lm = str(cand) if cand.is_file() else None
        if lm == "none":
            lm = None
        vs = load_set(spec, image_root=a.images, landmarks=lm, template=template, skip_bad=a.skip_bad)
        res = evaluate_set(rec, vs, batch_size=a.batch_size, flip=flip, nrof_folds=a.folds)
        dt = time.time() - t0
        print(f"{spec}: accuracy {100 * res['accuracy_mean']:.2f}% +- {100 * res['accuracy_std']:.2f} "
              f"({a.folds} folds, {res['num_pairs']} pairs, {len(res['skipped'])} skipped, "
              f"{len(vs.images)} images, {dt:.0f} s)")
        for msg in res["skipped"][:10]:
            print(f"  skipped: {msg}")
        results[spec] = {"accuracy": res["accuracy_mean"], "std": res["accuracy_std"],
                         "fold_accuracy": res["accuracy"].tolist(),
                         "best_thresholds": res["best_thresholds"].tolist(),
                         "tpr_at_fpr": res["tpr_at_fpr"], "num_pairs": res["num_pairs"],
                         "skipped": res["skipped"], "model": a.model, "checkpoint": a.checkpoint,
                         "flip": flip, "template": template if lm else None}
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
