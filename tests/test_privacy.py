"""Privacy suite: metric values, the representations each row attacks, the end-to-end attack on ``tiny``."""
from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import block_mean_recognizer
from ppfr_jax import config_lib, evaluate, frequency, privacy
from ppfr_jax.privacy import views

ROOT = pathlib.Path(__file__).resolve().parent.parent


def privacy_config(arg: str):
    return config_lib.load_config_spec(f"{ROOT / 'configs' / 'privacy.py'}:{arg}")


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    """Four real aligned faces (uint8 (4, 112, 112, 3)) from the demo DevTest set."""
    images, _ = evaluate.load_set("demo").interleaved()
    return images[[0, 1, 2, 1000]]


# ----------------------------------------------------------------------------- metrics


def _np_ssim(a, b, max_val=1.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """Textbook SSIM (Wang et al. 2004): Gaussian window, 'valid' filtering, mean over pixels and channels."""
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g /= g.sum()

    def filt(z):
        z = np.apply_along_axis(lambda v: np.convolve(v, g, "valid"), 0, z)
        return np.apply_along_axis(lambda v: np.convolve(v, g, "valid"), 1, z)

    mu_a, mu_b = filt(a), filt(b)
    s_aa = filt(a * a) - mu_a ** 2
    s_bb = filt(b * b) - mu_b ** 2
    s_ab = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    m = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
    return float(m.mean())


def test_identical_images_give_ssim_one_and_capped_psnr():
    a = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    m = privacy.visual_metrics(a, a)
    np.testing.assert_allclose(np.asarray(m["ssim"]), 1.0, atol=1e-5)
    # identical images: PSNR is capped (not inf) so means and privacy.json stay finite
    np.testing.assert_array_equal(np.asarray(m["psnr"]), privacy.PSNR_CAP)


@pytest.mark.parametrize("offset", [0.1, 0.03])
def test_psnr_of_constant_offset_matches_formula(offset):
    face = np.random.default_rng(1).uniform(0.0, 0.8, size=(3, 40, 40, 3)).astype(np.float32)
    m = privacy.visual_metrics(face + offset, face)
    want = 10 * np.log10(1.0 / offset ** 2)  # 10 log10(max^2 / mse), max = 1
    np.testing.assert_allclose(np.asarray(m["psnr"]), want, rtol=1e-4)
    # a pure brightness shift only touches SSIM's luminance term: high, but below 1
    assert np.all(np.asarray(m["ssim"]) < 1.0) and np.all(np.asarray(m["ssim"]) > 0.8)


def test_ssim_matches_numpy_reference():
    rng = np.random.default_rng(2)
    a = rng.uniform(size=(24, 28, 3))
    b = np.clip(0.7 * a + 0.3 * rng.uniform(size=a.shape), 0, 1)
    got = np.asarray(privacy.visual_metrics(a[None].astype(np.float32), b[None].astype(np.float32))["ssim"])[0]
    want = _np_ssim(a, b)
    assert 0.2 < want < 0.95  # a non-trivial case
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_to_unit_ranges():
    u8 = np.array([[[[0, 255, 127]]]], np.uint8)
    np.testing.assert_allclose(np.asarray(privacy.to_unit(u8)), [[[[0.0, 1.0, 127 / 255]]]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(privacy.to_unit(np.float32([[[[-1.0, 1.0, 0.0]]]]))),
                               [[[[0.0, 1.0, 0.5]]]])


# ----------------------------------------------------------------------------- representations


@pytest.mark.slow
def test_duetface_view_has_server_channels_only(faces):
    config = privacy_config("tiny")
    rep = privacy.load_duetface(config, jax.random.key(0))
    assert rep.source == "untrained"
    x = jnp.asarray(faces, jnp.float32) / 127.5 - 1.0
    inputs, protected = jax.jit(rep.apply)(rep.variables, x, jax.random.key(1))
    assert inputs.shape == (4, 112, 112, 162 + 4) and protected.shape == (4, 112, 112, 3)
    server, client = frequency.split_channels(frequency.dct_transform(x))
    np.testing.assert_allclose(np.asarray(inputs[..., :162]), np.asarray(server), rtol=1e-5, atol=1e-3)
    masks = np.asarray(inputs[..., 162:])
    assert masks.min() >= -1e-6 and masks.max() <= 1 + 1e-6
    # the view's decode (from the channels it sent) is duetface_server_image's (a fresh DCT)
    _, decoded = views.duetface_server_image(x)
    np.testing.assert_allclose(np.asarray(protected), np.asarray(decoded), rtol=0, atol=1e-5)
    # the decoded view has no client (low-frequency) content: re-DCT it and the 30 client channels
    # hold ~1e-5 of the face's client energy (not 0: decode -> re-encode is not the identity)
    _, client_again = frequency.split_channels(frequency.dct_transform(protected * 2 - 1))
    ratio = float(jnp.mean(client_again ** 2) / jnp.mean(client ** 2))
    assert ratio < 1e-4, ratio
    # ... and it is not the face (the full decode is)
    full = frequency.idct_transform(frequency.dct_transform(x))
    assert float(jnp.mean(jnp.abs(full - (x * 0.5 + 0.5)))) < 0.01
    assert float(jnp.mean(jnp.abs(protected - (x * 0.5 + 0.5)))) > 0.1


def test_duetface_decoded_attacker_input():
    config = privacy_config("tiny")
    config.duetface.attacker_input = "decoded"
    rep = privacy.load_duetface(config, jax.random.key(0))
    assert rep.channels() == 3 + 4
    config.duetface.attacker_input = "pixels"
    with pytest.raises(ValueError, match="attacker_input"):
        privacy.load_duetface(config, jax.random.key(0))


@pytest.mark.slow
def test_minusface_fresh_key_changes_xp_fixed_theta_does_not(faces):
    config = privacy_config("tiny")
    split, variables, source = privacy.load_minusface_generator(config, jax.random.key(0))
    assert source == "untrained"
    fresh = privacy.minusface_view(split, variables)
    fixed = privacy.minusface_view(split, variables, fixed_theta=privacy.fixed_theta(7))
    x = jnp.asarray(faces, jnp.float32) / 127.5 - 1.0
    f_fresh, f_fixed = jax.jit(fresh.apply), jax.jit(fixed.apply)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a1, p1 = f_fresh(variables, x, k1)
    a2, p2 = f_fresh(variables, x, k2)
    assert a1.shape == (4, 112, 112, 3) and p1.shape == (4, 112, 112, 3)
    assert float(p1.min()) >= 0 and float(p1.max()) <= 1
    np.testing.assert_array_equal(np.asarray(f_fresh(variables, x, k1)[1]), np.asarray(p1))  # same key, same X_p
    assert float(jnp.mean(jnp.abs(p1 - p2))) > 0.01  # a fresh key gives a different X_p
    b1, q1 = f_fixed(variables, x, k1)
    _, q2 = f_fixed(variables, x, k2)
    np.testing.assert_array_equal(np.asarray(q1), np.asarray(q2))  # one θ, whatever the key
    np.testing.assert_allclose(np.asarray(b1), np.asarray(q1) * 2 - 1, atol=1e-6)
    # ... and that θ is applied to every image: the same as shuffling each residue with it
    r = split.model.apply(variables, x, method=lambda m, x: m.residue(x)["x_residue_up"])
    theta = jnp.broadcast_to(jnp.asarray(privacy.fixed_theta(7)), (4, 192))
    np.testing.assert_allclose(np.asarray(q1), np.asarray(frequency.shuffle_decode(r, perms=theta)), atol=1e-5)
    with pytest.raises(ValueError, match="permutation"):
        privacy.minusface_view(split, variables, fixed_theta=np.arange(10))


@pytest.mark.slow
def test_minusface_generator_from_engine_checkpoint(tmp_path):
    """A generator saved in the engine's layout (<workdir>/checkpoints/<step>/state) is found and checked."""
    import orbax.checkpoint as ocp
    from ppfr_jax.models import unet

    config = privacy_config("tiny")
    gen = unet.UNet(192, 192, tuple(config.minusface.generator_widths))
    params = jax.tree.map(np.asarray, gen.init(jax.random.key(3), jnp.zeros((1, 112, 112, 192)))["params"])
    with ocp.StandardCheckpointer() as ck:
        ck.save(os.path.abspath(tmp_path / "run" / "checkpoints" / "5" / "state"),
                {"params": {"generator": params, "recognizer": {"w": np.zeros(3, np.float32)}}})
    config.minusface.workdir = str(tmp_path / "run")
    config.allow_untrained = False
    _, variables, source = privacy.load_minusface_generator(config, jax.random.key(0))
    assert source.endswith("(step 5)")
    got = variables["params"]["generator"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, params)
    config.minusface.generator_widths = (4, 16)
    with pytest.raises(ValueError, match="generator_widths"):
        privacy.load_minusface_generator(config, jax.random.key(0))


def test_rows_without_checkpoints_are_skipped_with_the_command(tmp_path):
    config = privacy_config(f"demo,duetface_workdir={tmp_path}/none,minusface_workdir={tmp_path}/none")
    reps, skipped = privacy.suite._representations(config, jax.random.key(0), log=lambda m: None)
    assert [r.name for r, _ in reps] == ["raw"]
    assert sorted(skipped) == ["duetface", "minusface", "minusface_fixed_theta"]
    assert "configs/duetface.py:server,demo" in skipped["duetface"]
    assert "configs/minusface.py:stage1,demo" in skipped["minusface"]
    assert "minusface_fixed_theta" in skipped["minusface_fixed_theta"] and "no checkpoint" in skipped["minusface"]
    with pytest.raises(ValueError, match="unknown row"):
        privacy.suite._representations(privacy_config("tiny,rows=raw+rgb"), jax.random.key(0), log=print)


def test_balanced_pair_subset():
    config = privacy_config("tiny")
    es = privacy.load_eval_set(config)
    assert es.issame.tolist() == [True, False] * 5  # LFW lists all same pairs first: not a prefix
    assert es.pairs.max() == len(es.images) - 1 and es.images.shape[1:] == (112, 112, 3)
    images, same = evaluate.load_set("demo").interleaved()
    # pair 1 of the subset is the first "different" pair of the file
    first_diff = int(np.flatnonzero(~same)[0])
    np.testing.assert_array_equal(es.images[es.pairs[1]], images[2 * first_diff:2 * first_diff + 2])


# ----------------------------------------------------------------------------- end to end


@evaluate.register_model("_privacy_pixels")
def _pixels(checkpoint):
    return block_mean_recognizer(flip=None)


@pytest.mark.slow
def test_attack_end_to_end_tiny(tmp_path):
    # raw + the fixed-θ row (one attacker, two evaluations); the DuetFace and fresh-θ representations
    # are checked above, and every row goes through the same attacker code
    config = privacy_config("tiny,rows=raw+minusface_fixed_theta,recognizer_model=_privacy_pixels,recognizer=-")
    out = privacy.run_privacy(config, str(tmp_path), log=lambda m: None)
    data = json.loads((tmp_path / "privacy.json").read_text())
    methods = [r["method"] for r in data["rows"]]
    assert methods == ["raw", privacy.FIXED_SAME, privacy.FIXED_FRESH]
    assert data["rows"] == json.loads(json.dumps(out["rows"]))
    for r in data["rows"]:
        for key in ("ssim", "psnr", "attacker_accuracy", "protected_ssim", "protected_psnr"):
            assert isinstance(r[key], float) and np.isfinite(r[key]), (r["method"], key, r[key])
        assert -1 <= r["ssim"] <= 1 and 0 <= r["attacker_accuracy"] <= 1
        assert r["n_images"] == data["eval_set"]["n_images"] > 0 and r["n_pairs"] == 10
        assert r["attacker_steps"] == 2 and r["weights"] in ("-", "untrained")
    raw = data["rows"][0]
    assert raw["protected_ssim"] > 0.999 and raw["protected_psnr"] == privacy.PSNR_CAP
    assert data["rows"][1]["protected_ssim"] < 0.9  # X_p is not the face
    assert data["rows"][1]["weights"] == data["rows"][2]["weights"] == "untrained"
    assert 0 <= data["reference_accuracy"]["accuracy"] <= 1 and data["skipped"] == {}

    table = (tmp_path / "privacy.md").read_text()
    for m in methods:
        assert f"| {m} |" in table
    es = privacy.load_eval_set(config)
    for r in data["rows"]:
        grid = np.asarray(Image.open(tmp_path / r["grid"]))
        assert grid.shape == (3 * 112 + 2 * 2, 3 * 112 + 2 * 2, 3)
        np.testing.assert_array_equal(grid[:112, :112], es.images[0])  # column 1 is the original face
    assert list(tmp_path.glob("events.out.tfevents.*")), "no TensorBoard summary written"


# ----------------------------------------------------------------------------- the real recogniser


def test_real_mobilefacenet_scores_faces_not_blanks(shared_dir):
    """The CASIA MobileFaceNet (../shared) verifies the original DevTest faces, and blank ones at chance."""
    ckpt = shared_dir / "data" / "models" / "mobilefacenet_casia_xiaoccer" / "068.ckpt"
    if not ckpt.is_file():
        pytest.skip(f"{ckpt} not present")
    config = privacy_config(f"tiny,recognizer={ckpt}")
    config.eval.max_pairs = 100
    es = privacy.load_eval_set(config)
    rec, desc = privacy.load_recognizer(config)
    assert "casia_mobilefacenet" in desc
    good = privacy.recognizer_accuracy(rec, es.images, es)
    blank = privacy.recognizer_accuracy(rec, np.full_like(es.images, 128), es)
    assert good["accuracy"] >= 0.85, good
    assert blank["accuracy"] <= 0.6, blank


def test_cli_needs_a_workdir(capsys):
    from ppfr_jax.cli import privacy as privacy_cli
    assert privacy_cli.main(["--config", str(ROOT / "configs" / "privacy.py") + ":tiny"]) == 2
    assert capsys.readouterr().err.startswith("ppfr-privacy: error: --config and --workdir are required")


def test_cli_help_and_a_mistyped_flag(capsys):
    from ppfr_jax.cli import privacy as privacy_cli
    assert privacy_cli.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: ppfr-privacy --config")
    assert privacy_cli.main(["--workdri", "x", "--config", str(ROOT / "configs" / "privacy.py") + ":tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppfr-privacy: error: Unknown command line flag 'workdri'"), err
