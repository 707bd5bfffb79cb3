"""IJB-C-sized template pooling + pair scoring + ROC (``ppfr_jax.evaluate.ijb``) from precomputed embeddings.

    python bench/ijb_speed.py [--crops 469375 --templates 23124 --pairs 15658489 --genuine 19557 --dim 512]

Builds an IJB-C-shaped fixture in memory (IJB-C 1:1's counts by default; 3,531 subjects, templates of
1-4 media, random float32 embeddings around each subject's centre, detector scores in [0.5, 1]), then
times ``ijb.evaluate_features`` (steps 2-5: pooling, cosine of every pair, sklearn-style ROC, TPR at
1e-6 .. 1e-1) and prints one JSON line: pairs scored per second (``score_pairs`` alone), the seconds of
each step, and the process's peak resident memory (``resource.getrusage`` max RSS, fixture included).
The embedding itself (the network) is not part of it.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

import _common  # noqa: E402
from ppfr_jax.evaluate import ijb  # noqa: E402


def fixture(crops: int, templates: int, pairs: int, genuine: int, dim: int, subjects: int, seed: int):
    """-> (IJBMeta without files, per-crop embeddings (crops, dim) float32)."""
    rng = np.random.default_rng(seed)
    subject = rng.integers(0, subjects, templates)  # each template's identity
    tmpl = np.sort(rng.integers(0, templates, crops))
    tmpl[:templates] = np.arange(templates)  # every template has a face
    tmpl.sort()
    media = tmpl * 4 + rng.integers(0, 4, crops)  # 1-4 media per template
    centres = rng.standard_normal((subjects, dim)).astype(np.float32)
    feats = centres[subject[tmpl]]
    feats += 8.0 * rng.standard_normal((crops, dim), dtype=np.float32)
    by_subject = np.argsort(subject, kind="stable")
    starts = np.searchsorted(subject[by_subject], np.arange(subjects))
    counts = np.bincount(subject, minlength=subjects)
    # genuine: two templates of one subject (subjects with at least two); impostor: two random templates
    s = rng.choice(np.flatnonzero(counts >= 2), genuine)
    i = rng.integers(0, counts[s])
    j = (i + rng.integers(1, counts[s])) % counts[s]  # a different template of the same subject
    a, b = by_subject[starts[s] + i], by_subject[starts[s] + j]
    imp = rng.integers(0, templates, (pairs - genuine, 2))
    p = np.concatenate([np.stack([a, b], 1), imp])
    y = np.concatenate([np.ones(genuine, bool), subject[imp[:, 0]] == subject[imp[:, 1]]])
    ids = np.arange(templates, dtype=np.int64) * 7 + 3  # sparse template ids, as the release's
    meta = ijb.IJBMeta(target="IJBC", crop_dir=pathlib.Path("."), names=[f"{i}.jpg" for i in range(crops)],
                       landmarks=np.zeros((crops, 5, 2)), detector_scores=rng.uniform(0.5, 1.0, crops),
                       lines=np.arange(1, crops + 1), face_crop=np.arange(crops), templates=ids[tmpl],
                       medias=media, pairs=ids[p], labels=y)
    return meta, feats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--crops", type=int, default=469_375)
    ap.add_argument("--templates", type=int, default=23_124)
    ap.add_argument("--pairs", type=int, default=15_658_489)
    ap.add_argument("--genuine", type=int, default=19_557)
    ap.add_argument("--subjects", type=int, default=3_531)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t0 = time.perf_counter()
    meta, feats = fixture(a.crops, a.templates, a.pairs, a.genuine, a.dim, a.subjects, a.seed)
    fixture_s = time.perf_counter() - t0
    rss_fixture = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    t0 = time.perf_counter()
    ids, tf = ijb.template_features(feats, meta.templates, meta.medias, detector_scores=meta.detector_scores)
    pool_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = ijb.score_pairs(ids, tf, meta.pairs)
    score_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fpr, tpr, thr = ijb.roc(scores, meta.labels)
    at = ijb.tpr_at_fprs(fpr, tpr, thr)
    roc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = ijb.evaluate_features(feats, meta)  # the same three steps as one call (what ppfr-eval runs)
    total_s = time.perf_counter() - t0
    assert res["tpr_at_fpr"] == {k: v[0] for k, v in at.items()}
    _common.emit({
        "bench": "ijb_speed", "crops": a.crops, "templates": int(ids.size), "pairs": a.pairs, "dim": a.dim,
        "pairs_per_s": round(a.pairs / score_s), "score_s": round(score_s, 2), "pool_s": round(pool_s, 2),
        "roc_s": round(roc_s, 2), "evaluate_features_s": round(total_s, 2), "fixture_s": round(fixture_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "fixture_rss_mb": round(rss_fixture), "tpr_at_fpr": {f"{k:g}": round(v[0], 4) for k, v in at.items()},
        "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
