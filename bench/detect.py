"""MTCNN landmarks (``ppfr_jax.data.detect``) against the LFW 5-point table, and the crops both give.

    python bench/detect.py [--lfw ../shared/data/lfw] [--n 300] [--template arcface]

Faces: ``--n`` rows evenly spaced over the sorted table
``derived/lfw-deepfunneled_5pt.tsv`` (PFLD-GhostOne points, not hand-labelled:
``../shared/data/PROVENANCE.md`` section 5). For each deep-funneled 250x250
original: the largest detected face's five points vs the table's (pixel
distance per point; per face the mean, also divided by the table's
inter-ocular distance), and the crop aligned from the detector's points vs
the crop aligned from the table's: mean absolute difference (grey levels),
PSNR, and how far apart the two crops sample the photo (for every crop pixel,
where the other crop's pixel for the same photo point lies; mean and max over
the crop, in crop pixels). For scale, ``mad_table_shift1`` is the table crop
against itself moved by one crop pixel. One JSON line with the distribution.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from _common import emit  # noqa: E402
from ppfr_jax import align, image_io  # noqa: E402
from ppfr_jax.data import detect  # noqa: E402


def evenly_spaced(keys, n):
    keys = sorted(keys)
    return [keys[i * len(keys) // n] for i in range(n)]


def compare(img, table_lm, det_lm, template="arcface"):
    """-> dict of per-face figures (module doc)."""
    err = np.linalg.norm(det_lm - table_lm, axis=1)
    iod = float(np.linalg.norm(table_lm[1] - table_lm[0]))
    a_det, m_det = align.align_face(img, det_lm, template)
    a_tab, m_tab = align.align_face(img, table_lm, template)
    h, w = a_tab.shape[:2]
    d = a_det.astype(np.float64) - a_tab.astype(np.float64)
    ys, xs = np.mgrid[0:h, 0:w]
    grid = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    inv_tab = np.linalg.inv(np.vstack([m_tab, [0, 0, 1]]))[:2]
    disp = np.linalg.norm(align.transform_points(align.transform_points(grid, inv_tab), m_det) - grid, axis=1)
    shifted = m_tab.copy()
    shifted[0, 2] += 1.0
    a_shift = align.warp_affine(img, shifted, (h, w))
    return {"lm_err": err, "lm_mean": float(err.mean()), "lm_mean_over_iod": float(err.mean() / iod),
            "crop_mad": float(np.abs(d).mean()), "crop_psnr": float(10 * np.log10(255.0 ** 2 / max((d ** 2).mean(), 1e-12))),
            "grid_disp_mean": float(disp.mean()), "grid_disp_max": float(disp.max()),
            "mad_table_shift1": float(np.abs(a_shift.astype(np.float64) - a_tab).mean())}


def _dist(v):
    v = np.asarray(v, np.float64)
    return {"median": round(float(np.median(v)), 3), "p10": round(float(np.percentile(v, 10)), 3),
            "p90": round(float(np.percentile(v, 90)), 3), "min": round(float(v.min()), 3),
            "max": round(float(v.max()), 3)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lfw", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "lfw"))
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--template", default="arcface")
    a = p.parse_args()
    table = align.read_landmarks_tsv(os.path.join(a.lfw, "derived", "lfw-deepfunneled_5pt.tsv"))
    keys = evenly_spaced(table, a.n)
    t0 = time.perf_counter()
    detect.detect_faces(np.zeros((64, 64, 3), np.uint8))  # build the detector (TF import, weights)
    t_load = time.perf_counter() - t0
    rows, none, multi, t_det = [], [], [], 0.0
    for k in keys:
        img = image_io.decode_rgb(os.path.join(a.lfw, k))
        t0 = time.perf_counter()
        faces = detect.detect_faces(img)
        t_det += time.perf_counter() - t0
        if not faces:
            none.append(k)
            continue
        if len(faces) > 1:
            multi.append(k)
        r = compare(img, table[k], faces[0].landmarks.astype(np.float64), a.template)
        r["key"] = k
        rows.append(r)
    lm_mean = np.array([r["lm_mean"] for r in rows])
    per_point = np.stack([r["lm_err"] for r in rows])
    far = sorted((r for r in rows if r["lm_mean"] > 5), key=lambda r: -r["lm_mean"])
    emit({"bench": "detect_vs_lfw_table", "n": a.n, "detected": len(rows), "no_face": none,
          "several_faces": len(multi), "template": a.template,
          "lm_mean_px": _dist(lm_mean), "lm_point_median_px": [round(float(v), 3) for v in np.median(per_point, 0)],
          "lm_mean_over_iod": _dist([r["lm_mean_over_iod"] for r in rows]),
          "frac_lm_mean_within": {str(t): round(float((lm_mean <= t).mean()), 4) for t in (2, 3, 4, 5, 10)},
          "crop_mad": _dist([r["crop_mad"] for r in rows]), "crop_psnr_db": _dist([r["crop_psnr"] for r in rows]),
          "grid_disp_mean_px": _dist([r["grid_disp_mean"] for r in rows]),
          "grid_disp_max_px": _dist([r["grid_disp_max"] for r in rows]),
          "mad_table_shift1": _dist([r["mad_table_shift1"] for r in rows]),
          "over_5px": [(r["key"], round(r["lm_mean"], 1)) for r in far],
          "detector_load_s": round(t_load, 2), "detect_s_per_image": round(t_det / len(keys), 4)})


if __name__ == "__main__":
    main()
