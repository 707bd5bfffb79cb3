"""IJB-B / IJB-C 1:1 verification (ppfr_jax.evaluate.ijb, ``ppfr-eval --ijb``) on small IJB-shaped fixtures."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from conftest import block_mean_recognizer
from ppfr_jax import align
from ppfr_jax import evaluate as ev
from ppfr_jax.cli import eval as eval_cli
from ppfr_jax.errors import PpfrError
from ppfr_jax.evaluate import ijb


# ----------------------------------------------------------------------------- fixtures


def write_meta(root: pathlib.Path, target: str, names, templates, medias, landmarks, scores, pairs, labels,
               pts_order=None) -> pathlib.Path:
    """The release's three meta files under ``root/<target>/meta`` (the 5-point table in ``pts_order``)."""
    t = target.lower()
    meta = root / target / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    (root / target / "loose_crop").mkdir(exist_ok=True)
    (meta / f"{t}_face_tid_mid.txt").write_text(
        "".join(f"{n} {a} {b}\n" for n, a, b in zip(names, templates, medias)))
    order = range(len(names)) if pts_order is None else pts_order
    (meta / f"{t}_name_5pts_score.txt").write_text("".join(
        f"{names[i]} " + " ".join(f"{v:.6f}" for v in np.asarray(landmarks[i]).reshape(-1)) + f" {scores[i]:.6f}\n"
        for i in order))
    (meta / f"{t}_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {int(c)}\n" for (a, b), c in zip(pairs, labels)))
    return root


def synthetic(tmp_path, seed=0, n_id=20, dim=16, pts_order=None, target="IJBC"):
    """An IJB-shaped fixture without images: identities -> templates (1-3 media of 1-3 faces) -> pairs.

    Returns (root, per-crop embeddings (C, D) in face_tid_mid order, names).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_id, dim))
    names, templates, medias, feats, ident = [], [], [], [], {}
    tid, mid = 100, 5000
    for i in range(n_id):
        for _ in range(2):  # two templates per identity
            tid += int(rng.integers(1, 4))  # sparse ids, as the release's
            ident[tid] = i
            for _ in range(int(rng.integers(1, 4))):
                mid += 1
                for _ in range(int(rng.integers(1, 4))):
                    names.append(f"{len(names) + 1}.jpg")
                    templates.append(tid)
                    medias.append(mid)
                    feats.append(centres[i] + 2.5 * rng.standard_normal(dim))
    tids = sorted(ident)
    pairs = [(a, b) for k, a in enumerate(tids) for b in tids[k + 1:]]
    labels = [ident[a] == ident[b] for a, b in pairs]
    lm = rng.uniform(10, 100, (len(names), 5, 2))
    scores = rng.uniform(0.5, 1.0, len(names))
    write_meta(tmp_path, target, names, templates, medias, lm, scores, pairs, labels, pts_order=pts_order)
    return tmp_path, np.asarray(feats, np.float32), names


# ----------------------------------------------------------------------------- brute-force references


def ref_templates(feats, templates, medias, scores, use_detector_score):
    """insightface ``image2template_feature``, loop for loop."""
    x = feats.astype(np.float64) * (scores[:, None] if use_detector_score else 1.0)
    out = {}
    for t in np.unique(templates):
        ft, mt = x[templates == t], medias[templates == t]
        media = [ft[mt == m].mean(0) for m in np.unique(mt)]
        s = np.sum(media, 0)
        out[int(t)] = s / np.linalg.norm(s)
    return out


def ref_roc(scores, labels):
    """sklearn ``roc_curve`` (drop_intermediate=True) by counting at every distinct threshold."""
    thr = np.unique(scores)[::-1]
    tps = np.array([np.sum((scores >= t) & labels) for t in thr])
    fps = np.array([np.sum((scores >= t) & ~labels) for t in thr])
    keep = [0] + [k for k in range(1, len(thr) - 1)
                  if tps[k + 1] - 2 * tps[k] + tps[k - 1] != 0 or fps[k + 1] - 2 * fps[k] + fps[k - 1] != 0]
    keep += [len(thr) - 1]
    tps, fps = np.r_[0, tps[keep]], np.r_[0, fps[keep]]
    return fps / labels.__invert__().sum(), tps / labels.sum()


def ref_tpr(fpr, tpr, x):
    """insightface's reading: ``min(zip(abs(fpr - x), range(len(fpr))))`` over the flipped curve."""
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    _, i = min(zip(abs(fpr - x), range(len(fpr))))
    return tpr[i]


def reference(root, target, feats, use_detector_score=True):
    t = target.lower()
    meta = root / target / "meta"
    rows = [l.split() for l in (meta / f"{t}_face_tid_mid.txt").read_text().splitlines()]
    pts = {l.split()[0]: float(l.split()[-1]) for l in (meta / f"{t}_name_5pts_score.txt").read_text().splitlines()}
    templates = np.array([int(r[1]) for r in rows])
    medias = np.array([int(r[2]) for r in rows])
    scores = np.array([pts[r[0]] for r in rows])
    tf = ref_templates(feats, templates, medias, scores, use_detector_score)
    pl = [list(map(int, l.split())) for l in (meta / f"{t}_template_pair_label.txt").read_text().splitlines()]
    s = np.array([float(tf[a] @ tf[b]) for a, b, _ in pl])
    y = np.array([c == 1 for _, _, c in pl])
    fpr, tpr = ref_roc(s, y)
    return s, {x: ref_tpr(fpr, tpr, x) for x in ijb.FPRS}


# ----------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("use_detector_score", [True, False])
def test_features_to_tpr_match_brute_force(tmp_path, use_detector_score):
    root, feats, _ = synthetic(tmp_path)
    meta = ijb.read_meta(root, "IJBC", check_crops=False)
    res = ijb.evaluate_features(feats, meta, use_detector_score=use_detector_score)
    s, tprs = reference(root, "IJBC", feats, use_detector_score)
    np.testing.assert_allclose(res["scores"], s, rtol=0, atol=1e-12)
    assert res["tpr_at_fpr"] == pytest.approx(tprs, abs=0)
    assert res["num_genuine"] == 20 and res["num_pairs"] == 40 * 39 // 2
    assert 0.5 < res["auc"] < 1.0 and 0.0 < res["tpr_at_fpr"][0.1] < 1.0  # not a degenerate fixture


def test_tables_in_different_orders_join_by_name(tmp_path):
    root, feats, names = synthetic(tmp_path / "a")
    perm = np.random.default_rng(1).permutation(len(names))
    root_b, _, _ = synthetic(tmp_path / "b", pts_order=perm)
    with open(root_b / "IJBC" / "meta" / "ijbc_name_5pts_score.txt", "a") as f:
        f.write("unused.jpg" + " 1" * 10 + " 0.9\n")  # in no template: not embedded
    a = ijb.evaluate_features(feats, ijb.read_meta(root, "IJBC", check_crops=False))
    mb = ijb.read_meta(root_b, "IJBC", check_crops=False)
    assert mb.names == [names[i] for i in perm]  # embedded rows: the crops used, in 5-point file order
    b = ijb.evaluate_features(feats[[names.index(n) for n in mb.names]], mb)
    np.testing.assert_allclose(b["scores"], a["scores"], rtol=0, atol=1e-12)


def test_known_tprs_by_hand():
    # ranked: + + + - - - + - - -. sklearn keeps (FPR, TPR) (0,0) (0,.25) (0,.75) (.5,.75) (.5,1) (1,1):
    # the steps at FPR 1/6, 2/6 (equal steps, collinear) are dropped, so 0.3 is nearest to FPR .5, TPR 1
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.5, 0.4, 0.2, 0.1, 0.0])
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    fpr, tpr, thr = ijb.roc(scores, labels)
    np.testing.assert_allclose(fpr, [0, 0, 0, .5, .5, 1])
    np.testing.assert_allclose(tpr, [0, .25, .75, .75, 1, 1])
    at = ijb.tpr_at_fprs(fpr, tpr, thr, (1e-6, 0.1, 0.3, 1.0))
    assert {k: v[0] for k, v in at.items()} == {1e-6: 0.75, 0.1: 0.75, 0.3: 1.0, 1.0: 1.0}
    assert at[0.3][1] == 0.3  # the threshold of that point
    assert ev.tpr_at_fpr(scores, labels, (0.3,))[0.3] == 0.75  # the full curve (no drop) reads FPR 2/6 instead
    rf, rt = ref_roc(scores, labels)
    np.testing.assert_allclose(fpr, rf)
    np.testing.assert_allclose(tpr, rt)


@pytest.mark.parametrize("dense_ratio", [0.0, 1e9])
def test_score_pairs_gram_and_gather_paths(dense_ratio):
    rng = np.random.default_rng(3)
    ids = np.sort(rng.choice(10_000, 700, replace=False))
    f = ijb.protocol.l2_normalize(rng.standard_normal((700, 24)))
    pairs = ids[rng.integers(0, 700, (5000, 2))]
    got = ijb.score_pairs(ids, f, pairs, block=64, dense_ratio=dense_ratio)
    r = np.searchsorted(ids, pairs)
    np.testing.assert_allclose(got, np.sum(f[r[:, 0]] * f[r[:, 1]], 1), rtol=0, atol=1e-12)
    with pytest.raises(ijb.IJBError, match="pair 2"):
        ijb.score_pairs(ids, f, np.array([[ids[0], ids[1]], [ids[0], 10_001]]))


# ----------------------------------------------------------------------------- errors


def test_errors_name_what_is_wrong(tmp_path):
    root, feats, names = synthetic(tmp_path)
    meta = root / "IJBC" / "meta"
    with pytest.raises(ijb.IJBError, match="unknown --target 'IJBA'"):
        ijb.read_meta(root, "IJBA")
    assert issubclass(ijb.IJBError, PpfrError)
    with pytest.raises(ijb.IJBError, match="IJBB/meta/ijbb_face_tid_mid.txt: no such file"):
        ijb.read_meta(root, "IJBB")
    # every crop the tables name must be in loose_crop: checked before anything is embedded
    with pytest.raises(ijb.IJBError, match=rf"{len(names)} of the {len(names)} crops .* e\.g\. 1\.jpg"):
        ijb.read_meta(root, "ijbc")

    pairs = meta / "ijbc_template_pair_label.txt"
    good = pairs.read_text()
    lines = good.splitlines()
    for bad_line, msg in [("101 102", "got 2 fields"), ("101 x 1", "template id 'x'"), ("101 102 2", "label '2'")]:
        pairs.write_text("\n".join(lines[:2] + [bad_line] + lines[2:]) + "\n")
        with pytest.raises(ijb.IJBError, match=rf"ijbc_template_pair_label.txt:3: .*{msg}"):
            ijb.read_meta(root, "IJBC", check_crops=False)
    pairs.write_text(good + lines[0].split()[0] + " 99999 0\n")
    with pytest.raises(ijb.IJBError, match="names template 99999"):
        ijb.read_meta(root, "IJBC", check_crops=False)
    pairs.unlink()
    with pytest.raises(ijb.IJBError, match="ijbc_template_pair_label.txt: no such file"):
        ijb.read_meta(root, "IJBC", check_crops=False)
    pairs.write_text(good)

    pts = meta / "ijbc_name_5pts_score.txt"
    good_pts = pts.read_text()
    pts.write_text(good_pts.replace(" ", " nan ", 1).split("\n", 1)[0] + "\n")
    with pytest.raises(ijb.IJBError, match="ijbc_name_5pts_score.txt:1: expected .* got 13"):
        ijb.read_meta(root, "IJBC", check_crops=False)
    pts.write_text("\n".join(good_pts.splitlines()[1:]) + "\n")  # crop 1.jpg has no 5 points
    with pytest.raises(ijb.IJBError, match="crop '1.jpg' .* has no line in"):
        ijb.read_meta(root, "IJBC", check_crops=False)
    pts.write_text(good_pts)
    tid = meta / "ijbc_face_tid_mid.txt"
    tid.write_text(tid.read_text().replace("2.jpg ", "2.jpg 7.5 ", 1))
    with pytest.raises(ijb.IJBError, match="ijbc_face_tid_mid.txt:2: expected .* got 4"):
        ijb.read_meta(root, "IJBC", check_crops=False)


# ----------------------------------------------------------------------------- end to end through ppfr-eval


WFLW_5 = [96, 97, 54, 76, 82]  # eye centres, nose tip, mouth corners of the 98 WFLW points


def real_looking_fixture(root: pathlib.Path, n_id: int = 5):
    """Demo LFW faces of ``n_id`` same-person pairs as loose crops (160x150, face scaled and shifted), with
    their 5 points from the demo WFLW landmarks; template A_k = the first face (two media: two loose crops
    of it), B_k = the second face; pairs A_i x B_j (genuine when i == j).

    Returns (root, the aligned demo face of each crop (C, 112, 112, 3)).
    """
    vs = ev.load_set("demo")
    lm98 = ev.demo_eval_landmarks()
    same = np.flatnonzero(vs.issame)[:n_id]
    crops = root / "IJBB" / "loose_crop"
    crops.mkdir(parents=True)
    names, templates, medias, lms, scores, faces = [], [], [], [], [], []
    rng = np.random.default_rng(0)
    for k, p in enumerate(same):
        for side in range(2):
            img = vs.images[vs.pairs[p, side]]
            pts = align.denormalize_points(lm98[2 * p + side][WFLW_5], (112, 112))
            for copy in range(2 if side == 0 else 1):
                s = rng.uniform(1.1, 1.3)
                m = np.array([[s, 0, rng.uniform(5, 20)], [0, s, rng.uniform(5, 15)]])
                loose = align.warp_affine(img, m, (160, 150))
                name = f"{len(names) + 1}.jpg"
                Image.fromarray(loose).save(crops / name, quality=95)
                names.append(name)
                templates.append(10 * k + side + 1)
                medias.append(100 * k + 10 * side + copy)
                lms.append(align.transform_points(pts, m))
                scores.append(rng.uniform(0.6, 1.0))
                faces.append(img)
    pairs = [(10 * i + 1, 10 * j + 2) for i in range(n_id) for j in range(n_id)]
    labels = [i == j for i in range(n_id) for j in range(n_id)]
    write_meta(root, "IJBB", names, templates, medias, lms, scores, pairs, labels)
    return root, np.stack(faces)


@ev.register_model("_ijb_pixels")
def _pixels(checkpoint):
    return block_mean_recognizer(flip="sum")


def test_cli_end_to_end_on_loose_crops(tmp_path, capsys):
    root, faces = real_looking_fixture(tmp_path / "ijb")
    out = tmp_path / "out"
    js = tmp_path / "r.json"
    assert eval_cli.main(["--model", "_ijb_pixels", "--checkpoint", "-", "--ijb", str(root), "--target", "IJBB",
                          "--out", str(out), "--batch-size", "4", "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "IJBB 1:1 verification" in printed and "1e-06" in printed and "AUC" in printed
    r = json.loads((out / "ijbb_results.json").read_text())
    assert json.loads(js.read_text())["IJBB"] == r
    assert r["num_crops"] == 15 and r["num_templates"] == 10 and r["num_pairs"] == 25 and r["num_genuine"] == 5
    assert set(r["tpr_at_fpr"]) == {"1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"}
    assert r["model"] == "_ijb_pixels" and r["use_detector_score"] and r["flip"] == "sum"

    # independently: the 5 points undo the loose crop (alignment gives the demo face back), and the
    # pair scores are the brute-force pooling of embed() on those aligned crops
    meta = ijb.read_meta(root, "IJBB")
    aligned = np.stack([align.align_face(np.asarray(Image.open(meta.crop_dir / n).convert("RGB")), lm)[0]
                        for n, lm in zip(meta.names, meta.landmarks)])
    assert np.abs(aligned.astype(float) - faces).mean() < 12  # JPEG + two resamplings
    rec = block_mean_recognizer(flip="sum")
    feats = ev.embed(rec.apply_fn, aligned, flip="sum", preprocess=rec.preprocess)
    s, tprs = reference(root, "IJBB", feats)
    scores = np.load(out / "ijbb_scores.npy")
    np.testing.assert_allclose(scores, s, rtol=0, atol=1e-6)
    assert r["tpr_at_fpr"] == pytest.approx({f"{k:g}": v for k, v in tprs.items()}, abs=0)

    png = Image.open(out / "ijbb_roc.png")
    assert png.format == "PNG" and png.size == (640, 480)
    px = np.asarray(png.convert("RGB")).reshape(-1, 3)
    assert (np.all(px == (102, 194, 165), axis=1)).sum() > 100  # the curve is drawn, in its colour

    # errors through the CLI: one line, exit 2
    assert eval_cli.main(["--model", "_ijb_pixels", "--checkpoint", "-", "--ijb", str(root), "--target", "IJBX",
                          "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "ppfr-eval: error: unknown --target 'IJBX'; known: IJBB, IJBC"
    (meta.crop_dir / "3.jpg").unlink()
    assert eval_cli.main(["--model", "_ijb_pixels", "--checkpoint", "-", "--ijb", str(root), "--target", "IJBB",
                          "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppfr-eval: error: ") and "1 of the 15 crops" in err and "3.jpg" in err
