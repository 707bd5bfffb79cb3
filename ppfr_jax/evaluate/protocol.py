"""The face-verification protocol: k-fold accuracy, ROC, TPR@FPR. numpy only (no JAX, no TensorFlow).

TFace ``test/utils.py:evaluate`` / insightface ``verification.py``:
embeddings are L2-normalised, pair ``i`` is rows ``2i`` and ``2i+1``, its
distance is the squared L2 distance (``2 - 2 cos``, in [0, 4]), a pair is
predicted "same" when ``dist < threshold``. The pairs are cut into 10
consecutive folds (``KFold(10, shuffle=False)``); for each fold the threshold
of ``THRESHOLDS = np.arange(0, 4, 0.01)`` with the best accuracy on the
other nine (first argmax) is applied to it. Reported: mean and std (ddof 0)
of the fold accuracies. On LFW ``pairs.txt`` (10 x 600 pairs in file order)
the folds are the official View 2 folds.

Errors: ``ValueError`` for mismatched shapes, too few pairs for the folds, or
non-finite embeddings.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

THRESHOLDS = np.arange(0, 4, 0.01)


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
