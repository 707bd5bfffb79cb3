"""IJB-B / IJB-C 1:1 template verification, as insightface ``recognition/arcface_torch/eval_ijbc.py`` runs it.

The official release, read as insightface and TFace (``recognition/test/IJB_Evaluation.py``) read it,
``t`` = ``ijbb`` | ``ijbc``::

    ROOT/<IJBB|IJBC>/meta/<t>_face_tid_mid.txt          image_name template_id media_id      (one crop per line)
    ROOT/<IJBB|IJBC>/meta/<t>_template_pair_label.txt   template_id1 template_id2 label(0|1)
    ROOT/<IJBB|IJBC>/meta/<t>_name_5pts_score.txt       image_name x1 y1 ... x5 y5 detector_score
    ROOT/<IJBB|IJBC>/loose_crop/<image_name>

Steps (:func:`evaluate_ijb`; :func:`evaluate_features` from per-crop embeddings on):

1. every crop is aligned with its 5 points (``ppfr_jax.align``, the recogniser's template) and
   embedded with flip fusion (``evaluate.embed``), streamed in batches (:func:`embed_crops`);
2. features are multiplied by the detector score (insightface's ``use_detector_score=True``;
   TFace's default is off), optionally L2-normalised first (``normalize_faces``: both
   references' ``use_norm_score=False``; insightface keeps the norms);
3. within a template the features of each media are averaged, the media sums summed and the
   template L2-normalised (their ``image2template_feature``; :func:`template_features`);
4. every pair is scored by the cosine of its two templates (:func:`score_pairs`, float64 as theirs);
5. the ROC is sklearn's ``roc_curve(label, score)`` (``drop_intermediate=True``, their call) and
   TPR@FPR the point nearest each FPR, the highest TPR among equal FPRs (:func:`tpr_at_fprs`),
   at insightface's ``FPRS`` = 1e-6 .. 1e-1.

A crop's embedding is found by its name: the two tables need not list the crops in the same
order (the release does; insightface relies on it). Errors: :class:`IJBError` (a ``PpfrError``,
``ValueError``) naming the file and line, or the crop, or the target; decoding errors of a crop
are ``evaluate.BadInputError``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageDraw, ImageFont

from ppfr_jax import align
from ppfr_jax.errors import PpfrError
from ppfr_jax.evaluate import protocol
from ppfr_jax.evaluate.embedding import WithVariables, embed
from ppfr_jax.evaluate.recognizers import Recognizer, fit_to_input
from ppfr_jax.evaluate.sets import decode_images

TARGETS = ("IJBB", "IJBC")
FPRS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # insightface's table columns


class IJBError(PpfrError, ValueError):
    """An IJB input is unusable (unknown target, missing meta file or crop, malformed line); names it."""


@dataclasses.dataclass
class IJBMeta:
    """The three meta tables of one target, joined.

    Attributes:
      target: "IJBB" or "IJBC".
      crop_dir: the ``loose_crop`` folder.
      names: (C,) crop file names, the rows of ``<t>_name_5pts_score.txt`` that a template uses, in file order.
      landmarks: (C, 5, 2) float64 pixel coordinates in the loose crop.
      detector_scores: (C,) float64.
      lines: (C,) int, the line of each crop in the 5-point table (for errors).
      face_crop: (F,) int, for each line of ``<t>_face_tid_mid.txt`` its row in ``names``.
      templates, medias: (F,) int64 template and media id of each of those lines.
      pairs: (P, 2) int64 template ids; labels: (P,) bool (1 = same identity).
    """

    target: str
    crop_dir: pathlib.Path
    names: list[str]
    landmarks: np.ndarray
    detector_scores: np.ndarray
    lines: np.ndarray
    face_crop: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray


def check_target(target: str) -> str:
    """-> "IJBB" / "IJBC" (case-insensitive). Raises IJBError for anything else."""
    t = str(target).upper()
    if t not in TARGETS:
        raise IJBError(f"unknown --target {target!r}; known: {', '.join(TARGETS)}")
    return t


def meta_paths(root: str | os.PathLike, target: str) -> dict[str, pathlib.Path]:
    """Where the release keeps a target's files: keys ``dir``, ``face_tid_mid``, ``pairs``, ``5pts``, ``crops``.

    ``root`` is the folder holding ``IJBB/`` and ``IJBC/`` (or the target's folder itself).
    """
    t = check_target(target)
    root = pathlib.Path(root)
    d = root / t
    if not d.is_dir() and root.name.upper() == t and (root / "meta").is_dir():
        d = root
    meta = d / "meta"
    return {"dir": d, "face_tid_mid": meta / f"{t.lower()}_face_tid_mid.txt",
            "pairs": meta / f"{t.lower()}_template_pair_label.txt",
            "5pts": meta / f"{t.lower()}_name_5pts_score.txt", "crops": d / "loose_crop"}


def _lines(path: pathlib.Path):
    """(line number, fields) of every non-blank line; IJBError when the file is missing."""
    try:
        f = open(path, "r", encoding="utf-8")
    except FileNotFoundError:
        raise IJBError(f"{path}: no such file (the IJB release's meta folder holds it)") from None
    except OSError as e:
        raise IJBError(f"{path}: cannot read ({e})") from None
    with f:
        try:
            for no, line in enumerate(f, 1):
                parts = line.split()
                if parts:
                    yield no, parts
        except UnicodeDecodeError as e:
            raise IJBError(f"{path}: not a text file ({e})") from None


def _int(path, no, value, what):
    try:
        return int(value)
    except ValueError:
        raise IJBError(f"{path}:{no}: {what} {value!r} is not an integer") from None


def read_face_tid_mid(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``<t>_face_tid_mid.txt`` -> (names (F,), templates (F,) int64, medias (F,) int64).

    Raises:
      IJBError: missing file, a line without exactly 3 fields or with a non-integer id (file:line), no lines.
    """
    path = pathlib.Path(path)
    names, tids, mids = [], [], []
    for no, p in _lines(path):
        if len(p) != 3:
            raise IJBError(f"{path}:{no}: expected 'image_name template_id media_id', got {len(p)} fields")
        names.append(p[0])
        tids.append(_int(path, no, p[1], "template id"))
        mids.append(_int(path, no, p[2], "media id"))
    if not names:
        raise IJBError(f"{path}: no lines")
    return names, np.asarray(tids, np.int64), np.asarray(mids, np.int64)


def read_name_5pts_score(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``<t>_name_5pts_score.txt`` -> (names (C,), landmarks (C, 5, 2) float64, scores (C,) float64, lines (C,)).

    Raises:
      IJBError: missing file, a line without 12 fields, a non-numeric or non-finite value, a name
        listed twice (file:line), no lines.
    """
    path = pathlib.Path(path)
    names, vals, lines, seen = [], [], [], {}
    for no, p in _lines(path):
        if len(p) != 12:
            raise IJBError(f"{path}:{no}: expected 'image_name x1 y1 ... x5 y5 detector_score' (12 fields), "
                           f"got {len(p)}")
        try:
            v = [float(x) for x in p[1:]]
        except ValueError:
            raise IJBError(f"{path}:{no}: non-numeric landmark or score in {' '.join(p)!r}") from None
        if not all(math.isfinite(x) for x in v):
            raise IJBError(f"{path}:{no}: landmark or score is not finite")
        if p[0] in seen:
            raise IJBError(f"{path}:{no}: crop {p[0]!r} is listed twice (first on line {seen[p[0]]})")
        seen[p[0]] = no
        names.append(p[0])
        vals.append(v)
        lines.append(no)
    if not names:
        raise IJBError(f"{path}: no lines")
    v = np.asarray(vals, np.float64)
    return names, v[:, :10].reshape(-1, 5, 2), v[:, 10], np.asarray(lines, np.int64)


def _bad_pair_line(path: pathlib.Path) -> IJBError:
    """The first malformed line of a pair file, as an error (the slow path after the fast parse failed)."""
    for no, p in _lines(path):
        if len(p) != 3:
            return IJBError(f"{path}:{no}: expected 'template_id1 template_id2 label', got {len(p)} fields")
        for v, what in zip(p, ("template id", "template id", "label")):
            _int(path, no, v, what)
        if p[2] not in ("0", "1"):
            return IJBError(f"{path}:{no}: label {p[2]!r} is not 0 or 1")
    return IJBError(f"{path}: cannot parse as 'template_id1 template_id2 label' lines")


def read_template_pairs(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``<t>_template_pair_label.txt`` -> (pairs (P, 2) int64 template ids, labels (P,) bool).

    15.7M lines for IJB-C: parsed by numpy's C reader (about a second per 10M lines); on a
    failure the file is scanned again to name the bad line.

    Raises:
      IJBError: missing file, a line without 3 integer fields, a label other than 0/1 (file:line), no pairs.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise IJBError(f"{path}: no such file (the IJB release's meta folder holds it)")
    try:
        a = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError:
        raise _bad_pair_line(path) from None
    if a.size == 0:
        raise IJBError(f"{path}: no pairs")
    if a.shape[1] != 3 or not np.isin(a[:, 2], (0, 1)).all():
        raise _bad_pair_line(path)
    return a[:, :2].copy(), a[:, 2].astype(bool)


def read_meta(root: str | os.PathLike, target: str, *, check_crops: bool = True) -> IJBMeta:
    """Read and join a target's three tables (module doc); with ``check_crops`` every crop must exist.

    Raises:
      IJBError: unknown target, missing file, malformed line, a crop named in ``face_tid_mid`` but not in
        the 5-point table, a pair naming a template no crop belongs to, crops missing from ``loose_crop``.
    """
    t = check_target(target)
    paths = meta_paths(root, t)
    face_names, templates, medias = read_face_tid_mid(paths["face_tid_mid"])
    names, lm, scores, lines = read_name_5pts_score(paths["5pts"])
    if face_names == names:
        face_crop = np.arange(len(names))
        used = face_crop
    else:
        row = {n: i for i, n in enumerate(names)}
        face_crop = np.empty(len(face_names), np.int64)
        for i, n in enumerate(face_names):
            r = row.get(n)
            if r is None:
                raise IJBError(f"{paths['face_tid_mid']}: crop {n!r} (line {i + 1}) has no line in "
                               f"{paths['5pts']}")
            face_crop[i] = r
        used = np.unique(face_crop)  # embed only the crops a template uses
        face_crop = np.searchsorted(used, face_crop)
    pairs, labels = read_template_pairs(paths["pairs"])
    known = np.unique(templates)
    absent = ~np.isin(pairs, known)
    if absent.any():
        i = int(np.flatnonzero(absent.any(1))[0])
        raise IJBError(f"{paths['pairs']}: pair {i + 1} ({pairs[i, 0]} {pairs[i, 1]}) names template "
                       f"{int(pairs[i][absent[i]][0])}, which no crop of {paths['face_tid_mid']} belongs to")
    meta = IJBMeta(target=t, crop_dir=paths["crops"], names=[names[i] for i in used], landmarks=lm[used],
                   detector_scores=scores[used], lines=lines[used], face_crop=face_crop, templates=templates,
                   medias=medias, pairs=pairs, labels=labels)
    if check_crops:
        missing_crops(meta, raise_error=True)
    return meta


def missing_crops(meta: IJBMeta, *, raise_error: bool = False) -> list[str]:
    """Names of crops the tables use that are not files in ``meta.crop_dir`` (one directory listing).

    Raises:
      IJBError (with ``raise_error``) naming the folder, the count and the first few.
    """
    d = meta.crop_dir
    if not d.is_dir():
        if raise_error:
            raise IJBError(f"{d}: no such folder (the IJB release's loose crops)")
        return list(meta.names)
    with os.scandir(d) as it:
        present = {e.name for e in it}
    missing = [n for n in meta.names if (n not in present if "/" not in n else not (d / n).is_file())]
    if missing and raise_error:
        raise IJBError(f"{d}: {len(missing)} of the {len(meta.names)} crops the meta tables name are not there, "
                       f"e.g. {', '.join(missing[:5])}")
    return missing


# ----------------------------------------------------------------------------- embedding


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def embed_crops(rec: Recognizer, meta: IJBMeta, *, flip: str | None = None, template: str | None = None,
                batch_size: int = 128, threads: int | None = None, log_every_s: float = 30.0,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Align and embed every crop of ``meta``, streamed: at most two batches are decoded at once.

    The next batch is decoded and aligned in a thread pool while the model runs on this one; every
    batch has ``batch_size`` rows (the last zero-padded), so the model compiles once.

    Args:
      rec: the recogniser; ``flip`` / ``template`` default to its own (``Recognizer.flip`` / ``.template``).
      progress: called ``progress(done, total)`` after each batch (besides the log line every ``log_every_s``).
    Returns:
      (C, D) float32 embeddings in ``meta.names`` order (D doubled by ``flip="concat"``), not normalised.
    Raises:
      IJBError: degenerate landmarks (naming the crop and its 5-point line); BadInputError: an unreadable crop.
    """
    flip = rec.flip if flip is None else (None if flip == "none" else flip)
    template = template or rec.template
    _, size_hw = align.template(template)
    n = len(meta.names)
    # one callable for every batch: embed's jit cache is keyed on it, so the model compiles once
    fn = rec.apply_fn if isinstance(rec.apply_fn, WithVariables) else WithVariables(
        lambda _unused, x, f=rec.apply_fn: f(x), None)
    pts_file = f"{meta.target.lower()}_name_5pts_score.txt"

    def prepare(lo: int) -> np.ndarray:
        hi = min(lo + batch_size, n)
        matrices = []
        for i in range(lo, hi):
            try:
                matrices.append(align.estimate_alignment(meta.landmarks[i], template))
            except ValueError as e:
                raise IJBError(f"{pts_file}:{meta.lines[i]}: crop {meta.names[i]!r}: {e}") from None
        images, _, _ = decode_images([str(meta.crop_dir / meta.names[i]) for i in range(lo, hi)],
                                     matrices=matrices, size_hw=size_hw, threads=threads)
        images = fit_to_input(images, rec.input_hw)
        if images.shape[0] < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - images.shape[0],) + images.shape[1:],
                                                      images.dtype)])
        return images

    out = None
    t0 = last = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as ahead:
        nxt = ahead.submit(prepare, 0)
        for lo in range(0, n, batch_size):
            images = nxt.result()
            if lo + batch_size < n:
                nxt = ahead.submit(prepare, lo + batch_size)
            e = embed(fn, images, flip=flip, batch_size=batch_size, preprocess=rec.preprocess)
            if out is None:
                out = np.empty((n, e.shape[1]), np.float32)
            hi = min(lo + batch_size, n)
            out[lo:hi] = e[:hi - lo]
            now = time.monotonic()
            if progress is not None:
                progress(hi, n)
            if now - last >= log_every_s or hi == n:
                last = now
                rate = hi / max(now - t0, 1e-9)
                logging.info("%s: %d/%d crops, %.1f images/s, ETA %s", meta.target, hi, n, rate,
                             _duration((n - hi) / rate))
    return out


# ----------------------------------------------------------------------------- templates, pairs, ROC


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray, *,
                      detector_scores: np.ndarray | None = None, normalize_faces: bool = False,
                      chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Pool per-face features into templates (insightface / TFace ``image2template_feature``).

    Each face's feature (optionally L2-normalised, then multiplied by its detector score) is
    averaged within its (template, media), the media means summed over the template, and the
    sum L2-normalised (a zero sum stays zero, as sklearn's ``normalize``). Computed as one weighted
    sum per template, weight ``score / faces in its media``, in float64, ``chunk`` faces at a time.

    Args:
      features: (F, D) per-face features (any float dtype).
      templates, medias: (F,) integer ids.
      detector_scores: (F,) or None (no weighting).
    Returns:
      (template ids (T,) int64 sorted, features (T, D) float64 unit rows).
    """
    x = np.asarray(features)
    t = np.asarray(templates, np.int64)
    m = np.asarray(medias, np.int64)
    if x.ndim != 2 or t.shape != (x.shape[0],) or m.shape != t.shape:
        raise ValueError(f"template_features: features {x.shape}, templates {t.shape}, medias {m.shape} "
                         f"do not match")
    ids, t_idx = np.unique(t, return_inverse=True)
    _, m_idx = np.unique(m, return_inverse=True)
    _, tm_idx, tm_count = np.unique(t_idx * (int(m_idx.max()) + 1) + m_idx, return_inverse=True,
                                    return_counts=True)
    w = 1.0 / tm_count[tm_idx]
    if detector_scores is not None:
        s = np.asarray(detector_scores, np.float64)
        if s.shape != t.shape:
            raise ValueError(f"template_features: detector_scores {s.shape} do not match {t.shape} faces")
        w = w * s
    order = np.argsort(t_idx, kind="stable")
    out = np.zeros((ids.size, x.shape[1]), np.float64)
    for lo in range(0, order.size, chunk):
        rows = order[lo:lo + chunk]
        f = x[rows].astype(np.float64)
        if normalize_faces:
            f = protocol.l2_normalize(f)
        f *= w[rows, None]
        seg = t_idx[rows]
        starts = np.r_[0, np.flatnonzero(np.diff(seg)) + 1]
        out[seg[starts]] += np.add.reduceat(f, starts, axis=0)  # seg[starts] distinct within a chunk
    return ids, protocol.l2_normalize(out)


def score_pairs(template_ids: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray, *,
                block: int = 256, dense_ratio: float = 128.0) -> np.ndarray:
    """Cosine of each pair's two (unit) templates, float64, vectorised in blocks.

    Pairs are grouped by their first template, ``block`` first templates at a time. A block's
    scores come from one matrix product with the second templates it uses when that product is at
    most ``dense_ratio`` times the block's pair count, else from gathered row-wise dot products
    (on 2 CPU cores a product entry costs about 1/200 of a gathered pair: ``bench/ijb_speed.py``).

    Args:
      template_ids: (T,) sorted ids; template_feats: (T, D).
      pairs: (P, 2) template ids, each in ``template_ids``.
    Returns:
      (P,) float64 scores in ``pairs`` order.
    Raises:
      IJBError: a pair names an id not in ``template_ids``.
    """
    ids = np.asarray(template_ids)
    feats = np.asarray(template_feats, np.float64)
    p = np.asarray(pairs)
    rows = np.searchsorted(ids, p)
    rows = np.minimum(rows, ids.size - 1)
    bad = ids[rows] != p
    if bad.any():
        i = int(np.flatnonzero(bad.any(1))[0])
        raise IJBError(f"pair {i + 1} ({p[i, 0]} {p[i, 1]}) names a template without faces")
    r1, r2 = rows[:, 0], rows[:, 1]
    order = np.argsort(r1, kind="stable")
    r1s, r2s = r1[order], r2[order]
    bounds = np.searchsorted(r1s, np.arange(0, ids.size + block, block))
    scores = np.empty(p.shape[0], np.float64)
    used = np.zeros(ids.size, bool)
    for b in range(len(bounds) - 1):
        lo, hi = bounds[b], bounds[b + 1]
        if lo == hi:
            continue
        a, c = r1s[lo:hi], r2s[lo:hi]
        t0 = b * block
        used[:] = False
        used[c] = True
        cols = np.flatnonzero(used)
        if min(block, ids.size - t0) * cols.size <= dense_ratio * (hi - lo):
            g = feats[t0:t0 + block] @ feats[cols].T
            pos = np.cumsum(used) - 1
            scores[order[lo:hi]] = g[a - t0, pos[c]]
        else:
            for s in range(lo, hi, 16384):
                e = min(s + 16384, hi)
                scores[order[s:e]] = np.einsum("ij,ij->i", feats[r1s[s:e]], feats[r2s[s:e]])
    return scores


def roc(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sklearn ``roc_curve(labels, scores)`` with its default ``drop_intermediate=True`` (the references' call).

    Points collinear with equal steps on both sides are dropped (sklearn's rule on the cumulative
    counts); the curve starts at (0, 0) with threshold +inf.

    Returns:
      fpr, tpr, thresholds: (K,) each, thresholds decreasing.
    """
    y = np.asarray(labels, bool)
    fpr, tpr, thr = protocol.roc_curve(scores, y)
    npos, nneg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tps = np.rint(tpr[1:] * npos).astype(np.int64)
    fps = np.rint(fpr[1:] * nneg).astype(np.int64)
    if tps.size > 2:
        keep = np.flatnonzero(np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True])
        keep = np.r_[0, keep + 1]
        fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
    return fpr, tpr, thr


def tpr_at_fprs(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray,
                targets: Sequence[float] = FPRS) -> dict[float, tuple[float, float]]:
    """{target: (tpr, threshold)} at the ROC point whose FPR is nearest each target (highest TPR among ties).

    insightface's ``min(zip(abs(fpr - x), range(len(fpr))))`` over the reversed curve.
    """
    fr, tr, hr = fpr[::-1], tpr[::-1], thresholds[::-1]
    out = {}
    for x in targets:
        i = int(np.argmin(np.abs(fr - x)))
        out[float(x)] = (float(tr[i]), float(hr[i]))
    return out


def evaluate_features(features: np.ndarray, meta: IJBMeta, *, use_detector_score: bool = True,
                      normalize_faces: bool = False, fprs: Sequence[float] = FPRS) -> dict[str, Any]:
    """Steps 2-5 of the module doc on per-crop embeddings (so tests and cached features skip the network).

    Args:
      features: (C, D) one row per ``meta.names`` entry.
    Returns:
      dict: ``tpr_at_fpr`` {fpr: tpr}, ``threshold_at_fpr`` {fpr: score threshold}, ``auc``,
      ``scores`` (P,) float64 in pair-file order, ``fpr`` / ``tpr`` (K,) the ROC, ``num_*`` counts.
    """
    f = np.asarray(features)
    if f.ndim != 2 or f.shape[0] != len(meta.names):
        raise ValueError(f"evaluate_features: need ({len(meta.names)}, D) features, got {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("evaluate_features: features contain NaN or inf")
    identity = np.array_equal(meta.face_crop, np.arange(f.shape[0]))  # the release's case: no (F, D) copy
    faces = f if identity else f[meta.face_crop]
    ids, tf = template_features(faces, meta.templates, meta.medias,
                                detector_scores=meta.detector_scores[meta.face_crop] if use_detector_score else None,
                                normalize_faces=normalize_faces)
    t0 = time.monotonic()
    scores = score_pairs(ids, tf, meta.pairs)
    dt = time.monotonic() - t0
    fpr, tpr, thr = roc(scores, meta.labels)
    at = tpr_at_fprs(fpr, tpr, thr, fprs)
    return {"tpr_at_fpr": {k: v[0] for k, v in at.items()}, "threshold_at_fpr": {k: v[1] for k, v in at.items()},
            "auc": float(np.trapezoid(tpr, fpr)), "scores": scores, "fpr": fpr, "tpr": tpr,
            "num_crops": len(meta.names), "num_faces": int(meta.templates.size), "num_templates": int(ids.size),
            "num_pairs": int(meta.labels.size), "num_genuine": int(meta.labels.sum()),
            "num_impostor": int((~meta.labels).sum()), "pairs_per_s": meta.labels.size / max(dt, 1e-9)}


# ----------------------------------------------------------------------------- outputs


def format_table(target: str, tpr_at_fpr: dict[float, float]) -> str:
    """insightface's printed table: one header row of FPRs, one row of TPR in percent (2 decimals)."""
    keys = list(tpr_at_fpr)
    head = " ".join(f"{k:>7.0e}" for k in keys)
    row = " ".join(f"{100 * tpr_at_fpr[k]:7.2f}" for k in keys)
    return f"{'FPR':<6} {head}\n{target:<6} {row}"


def draw_roc(path: str | os.PathLike, curves: Sequence[tuple[str, np.ndarray, np.ndarray]], *,
             title: str = "ROC on IJB", fpr_range: tuple[float, float] = (1e-6, 1e-1),
             size: tuple[int, int] = (640, 480)) -> None:
    """ROC curves as a PNG (PIL only): log FPR on x over ``fpr_range``, TPR on y from 0.3 (insightface's
    axes) or lower when a curve goes lower there, to 1; dashed grid; legend ``label``.

    Args:
      curves: (label, fpr (K,), tpr (K,)) each.
    """
    w, h = size
    left, right, top, bottom = 70, 20, 36, 56
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    lx0, lx1 = math.log10(fpr_range[0]), math.log10(fpr_range[1])
    inside = [t[(f >= fpr_range[0]) & (f <= fpr_range[1])] for _, f, t in curves]
    lo = min([0.3] + [float(v.min()) for v in inside if v.size])
    y0 = math.floor(lo * 10) / 10

    def px(f):
        return left + (np.log10(f) - lx0) / (lx1 - lx0) * (w - left - right)

    def py(t):
        return top + (1.0 - (t - y0) / (1.0 - y0)) * (h - top - bottom)

    def dashed(x0, y0_, x1, y1):
        n = int(max(abs(x1 - x0), abs(y1 - y0_)) // 8) + 1
        for k in range(n):
            a, b = k / n, min((k + 0.5) / n, 1.0)
            d.line([(x0 + a * (x1 - x0), y0_ + a * (y1 - y0_)), (x0 + b * (x1 - x0), y0_ + b * (y1 - y0_))],
                   fill=(200, 200, 200))

    for e in range(int(round(lx0)), int(round(lx1)) + 1):
        x = float(px(10.0 ** e))
        dashed(x, top, x, h - bottom)
        d.text((x, h - bottom + 6), f"1e{e}", fill="black", font=font, anchor="ma")
    for k in range(int(round((1.0 - y0) * 10)) + 1):
        t = y0 + k / 10
        y = float(py(t))
        dashed(left, y, w - right, y)
        d.text((left - 6, y), f"{t:.1f}", fill="black", font=font, anchor="rm")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text((w / 2, 10), title, fill="black", font=font, anchor="ma")
    d.text((w / 2, h - 20), "False Positive Rate", fill="black", font=font, anchor="ma")
    d.text((8, top - 18), "True Positive Rate", fill="black", font=font)
    colours = [(102, 194, 165), (252, 141, 98), (141, 160, 203), (231, 138, 195)]  # matplotlib Set2
    for j, (label, f, t) in enumerate(curves):
        keep = (f > 0) & (f <= fpr_range[1])  # beyond the axis: not drawn (clipped, it would be a false edge)
        x = np.clip(px(np.clip(f[keep], 1e-300, None)), left, w - right)
        y = np.clip(py(t[keep]), top, h - bottom)
        xy = np.rint(np.stack([x, y], 1)).astype(np.int64)
        if xy.shape[0] > 1:  # consecutive duplicates dropped: a monotone curve has at most W + H pixel points
            xy = xy[np.r_[True, np.any(np.diff(xy, axis=0) != 0, axis=1)]]
        c = colours[j % len(colours)]
        if xy.shape[0] > 1:
            d.line([tuple(v) for v in xy.tolist()], fill=c, width=2)
        ly = h - bottom - 16 * (len(curves) - j)
        d.line([(w - right - 190, ly), (w - right - 170, ly)], fill=c, width=2)
        d.text((w - right - 165, ly), label, fill="black", font=font, anchor="lm")
    img.save(path, "PNG")


def evaluate_ijb(rec: Recognizer, meta: IJBMeta, out_dir: str | os.PathLike, *, flip: str | None = None,
                 template: str | None = None, batch_size: int = 128, use_detector_score: bool = True,
                 normalize_faces: bool = False, label: str = "ppfr_jax", info: dict | None = None,
                 log_every_s: float = 30.0) -> dict[str, Any]:
    """The whole protocol (module doc) on a target's :func:`read_meta`; writes into ``out_dir``:

    ``<t>_scores.npy`` (P,) float64 pair scores in pair-file order (insightface saves ``<t>.npy``),
    ``<t>_roc.png`` (curve labelled ``label``), ``<t>_results.json`` (``summary`` below).

    Returns:
      :func:`evaluate_features`'s dict plus ``target``, ``flip``, ``template``, ``use_detector_score``,
      ``normalize_faces``, ``embed_s``, ``images_per_s``, ``wall_s``, ``files`` (output paths) and
      ``summary`` (all of it but the arrays, with ``info`` merged in: what the JSON file holds).
    """
    t_start = time.monotonic()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logging.info("%s: %d crops, %d faces, %d templates, %d pairs", meta.target, len(meta.names),
                 meta.templates.size, np.unique(meta.templates).size, meta.labels.size)
    feats = embed_crops(rec, meta, flip=flip, template=template, batch_size=batch_size, log_every_s=log_every_s)
    embed_s = time.monotonic() - t_start
    res = evaluate_features(feats, meta, use_detector_score=use_detector_score, normalize_faces=normalize_faces)
    t = meta.target.lower()
    paths = {"scores": out / f"{t}_scores.npy", "roc": out / f"{t}_roc.png", "results": out / f"{t}_results.json"}
    np.save(paths["scores"], res["scores"])
    draw_roc(paths["roc"], [(f"{label} (AUC = {100 * res['auc']:.4f} %)", res["fpr"], res["tpr"])],
             title=f"ROC on {meta.target}")
    res.update(target=meta.target, flip=rec.flip if flip is None else (None if flip == "none" else flip),
               template=template or rec.template, use_detector_score=use_detector_score,
               normalize_faces=normalize_faces, embed_s=embed_s, images_per_s=len(meta.names) / max(embed_s, 1e-9),
               wall_s=time.monotonic() - t_start, files={k: str(v) for k, v in paths.items()})
    summary = {k: v for k, v in res.items() if not isinstance(v, np.ndarray)}
    summary["tpr_at_fpr"] = {f"{k:g}": v for k, v in res["tpr_at_fpr"].items()}
    summary["threshold_at_fpr"] = {f"{k:g}": v for k, v in res["threshold_at_fpr"].items()}
    summary.update(info or {})
    paths["results"].write_text(json.dumps(summary, indent=1) + "\n")
    res["summary"] = summary
    return res
