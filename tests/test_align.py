"""Five-point similarity alignment (ppfr_jax.align)."""
import numpy as np
import pytest
from PIL import Image

from ppfr_jax import align
from ppfr_jax.cli import align as align_cli


def _similarity(angle, scale, tx, ty):
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, tx], [s, c, ty]])


def test_templates():
    arc, size_a = align.template("arcface")
    sph, size_s = align.template("sphereface")
    assert size_a == (112, 112) and size_s == (112, 96)
    np.testing.assert_allclose(arc - sph, [[8, 0]] * 5)
    # TFace / insightface numbers.
    np.testing.assert_allclose(arc[0], [38.2946, 51.6963])
    with pytest.raises(ValueError, match="unknown alignment template"):
        align.template("nope")


def test_umeyama_recovers_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 250, (5, 2))
    m = _similarity(0.3, 0.7, 12.0, -5.0)
    dst = align.transform_points(src, m)
    t = align.umeyama(src, dst)
    np.testing.assert_allclose(t[:2], m, atol=1e-9)
    np.testing.assert_allclose(t[2], [0, 0, 1])


def test_umeyama_least_squares_and_no_reflection():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (5, 2))
    mirrored = src * [-1, 1]  # best fit would be a reflection; a similarity must not reflect
    t = align.umeyama(src, mirrored)
    assert np.linalg.det(t[:2, :2]) > 0
    # The fitted transform is a least-squares optimum: perturbing it does not reduce the residual.
    noisy = align.transform_points(src, _similarity(-0.2, 1.3, 3, 4)) + rng.normal(0, 2, (5, 2))
    t = align.umeyama(src, noisy)[:2]
    base = np.sum((align.transform_points(src, t) - noisy) ** 2)
    for _ in range(20):
        a, s, x, y = rng.normal(0, 1e-3, 4)
        pert = t + np.array([[s, -a, x], [a, s, y]])
        assert np.sum((align.transform_points(src, pert) - noisy) ** 2) >= base - 1e-9


@pytest.mark.parametrize("bad", [np.zeros((5, 2)), np.full((5, 2), np.nan), np.zeros((5, 3))])
def test_umeyama_rejects_bad_points(bad):
    with pytest.raises(ValueError):
        align.umeyama(bad, align.ARCFACE_112[:, :bad.shape[1]] if bad.shape[1] == 2 else bad)


def test_estimate_alignment_shape_error():
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        align.estimate_alignment(np.zeros((4, 2)))


def test_warp_identity_and_integer_shift():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    np.testing.assert_array_equal(align.warp_affine(img, np.eye(3)[:2], (20, 24)), img)
    out = align.warp_affine(img, np.array([[1.0, 0, 3], [0, 1.0, -2]]), (20, 24))
    np.testing.assert_array_equal(out[:18, 3:], img[2:, :21])
    assert not out[:, :3].any() and not out[18:].any()  # black border


def test_warp_pil_matches_numpy_reference_borders_included():
    # The fast PIL path and the numpy definition (cv2 INTER_LINEAR, BORDER_CONSTANT 0)
    # agree to one grey level (rounding) everywhere, including the black-border band.
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (60, 50, 3), dtype=np.uint8)
    for _ in range(6):
        m = _similarity(rng.uniform(-0.6, 0.6), rng.uniform(0.5, 1.8), *rng.uniform(-25, 25, 2))
        fast = align.warp_affine(img, m, (64, 56)).astype(int)
        ref = align.warp_affine_numpy(img, m, (64, 56)).astype(int)
        assert np.abs(fast - ref).max() <= 1


def test_warp_half_pixel_is_average():
    img = np.zeros((4, 4), np.float32)
    img[:, 2] = 1.0
    out = align.warp_affine(img, np.array([[1.0, 0, -0.5], [0, 1.0, 0]]), (4, 4))  # float -> numpy path
    np.testing.assert_allclose(out[:, 1:3], 0.5)


def test_align_face_puts_landmarks_on_template():
    # Landmarks that are an exact similarity image of the template come back onto it.
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (250, 250, 3), dtype=np.uint8)
    for name in ("arcface", "sphereface"):
        pts, size = align.template(name)
        src_m = _similarity(0.25, 1.6, 40, 30)
        lm = align.transform_points(pts, src_m)
        face, m = align.align_face(Image.fromarray(img), lm, name)
        assert face.shape == size + (3,) and face.dtype == np.uint8
        np.testing.assert_allclose(align.transform_points(lm, m), pts, atol=1e-9)
        # and the warped pixels are the source pixels at the mapped positions
        inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
        y, x = 56, 40
        sx, sy = align.transform_points(np.array([x, y], float), inv)
        ref = align.warp_affine_numpy(img, m, size)[y, x]
        assert np.abs(face[y, x].astype(int) - ref.astype(int)).max() <= 1
        assert 0 <= sx < 250 and 0 <= sy < 250


def test_normalized_points_flip_is_one_minus_x():
    w, h = 112, 112
    cols = np.array([0.0, 10.0, 111.0])
    pts = np.stack([cols, np.zeros(3)], 1)
    n = align.normalize_points(pts, (h, w))
    flipped_cols = (w - 1) - cols  # where a horizontal flip moves these pixel centres
    nf = align.normalize_points(np.stack([flipped_cols, np.zeros(3)], 1), (h, w))
    np.testing.assert_allclose(nf[:, 0], 1 - n[:, 0])
    np.testing.assert_allclose(align.denormalize_points(n, (h, w)), pts)


def test_read_landmarks_tsv_and_lookup(tmp_path):
    p = tmp_path / "lm.tsv"
    p.write_text("# path\tx...\nroot/A/A_0001.jpg\t" + "\t".join(["1.5"] * 10) + "\n")
    tab = align.read_landmarks_tsv(p)
    assert tab["root/A/A_0001.jpg"].shape == (5, 2)
    look = align.LandmarkLookup(tab)
    assert look.get("A/A_0001.jpg") is not None and look.get("B/B_0001.jpg") is None
    p.write_text("a.jpg 1 2 3\n")
    with pytest.raises(ValueError, match=r"lm.tsv:1"):
        align.read_landmarks_tsv(p)
    p.write_text("x\n" "a.jpg " + " ".join(["z"] * 10) + "\n")
    with pytest.raises(ValueError, match=r"lm.tsv:1"):
        align.read_landmarks_tsv(p)


def test_cli_aligns_a_folder(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "in"
    rows = []
    for ident in ("Ann", "Bob"):
        (src / ident).mkdir(parents=True)
        f = src / ident / f"{ident}_0001.jpg"
        Image.fromarray(rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)).save(f)
        lm = align.transform_points(align.ARCFACE_112, _similarity(0.1, 0.8, 5, 3))
        rows.append(f"{ident}/{f.name}\t" + "\t".join(f"{v:.3f}" for v in lm.reshape(-1)))
    (tmp_path / "lm.tsv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert align_cli.main(["--images", str(src), "--landmarks", str(tmp_path / "lm.tsv"), "--out", str(out),
                       "--template", "sphereface", "--workers", "2"]) == 0
    for ident in ("Ann", "Bob"):
        with Image.open(out / ident / f"{ident}_0001.jpg") as im:
            assert im.size == (96, 112)
    # an image without a landmark row is an error unless skipped
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(src / "Bob" / "Bob_0002.jpg")
    assert align_cli.main(["--images", str(src), "--landmarks", str(tmp_path / "lm.tsv"), "--out", str(out)]) == 2
    assert align_cli.main(["--images", str(src), "--landmarks", str(tmp_path / "lm.tsv"), "--out", str(out),
                       "--skip-missing"]) == 0


def test_real_lfw_alignment_residual(shared_dir):
    # On a real deep-funneled LFW face the five detected points fit the template
    # to within a few pixels (a similarity cannot fit five points exactly).
    lfw = shared_dir / "data" / "lfw"
    tab = align.read_landmarks_tsv(lfw / "derived" / "lfw-deepfunneled_5pt.tsv")
    key = "lfw-deepfunneled/AJ_Cook/AJ_Cook_0001.jpg"
    with Image.open(lfw / key) as im:
        face, m = align.align_face(im, tab[key], "arcface")
    resid = np.linalg.norm(align.transform_points(tab[key], m) - align.ARCFACE_112, axis=1)
    assert face.shape == (112, 112, 3)
    assert resid.max() < 8.0, resid


def test_cli_missing_or_malformed_landmark_table(tmp_path, capsys):
    from PIL import Image
    (tmp_path / "in" / "Ann").mkdir(parents=True)
    Image.new("RGB", (250, 250)).save(tmp_path / "in" / "Ann" / "Ann_0001.jpg")
    args = ["--images", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--landmarks"]
    assert align_cli.main(args + [str(tmp_path / "missing.tsv")]) == 2
    assert capsys.readouterr().err.strip() == f"ppfr-align: error: --landmarks {tmp_path / 'missing.tsv'}: no such file"
    (tmp_path / "bad.tsv").write_text("Ann/Ann_0001.jpg 1 2 3\n")
    assert align_cli.main(args + [str(tmp_path / "bad.tsv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ppfr-align: error: --landmarks {tmp_path / 'bad.tsv'}: ") and ":1:" in err, err
