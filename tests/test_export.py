"""Deployment: ONNX export of the client half vs JAX, fresh MinusFace permutations, ppfr-protect -> ppfr-verify.

Models are the tiny configs with untrained weights (``--untrained``): the
numbers they compute mean nothing, but every tensor goes through the same
code as a trained run's. ONNX tolerance: ``deploy.onnx.TOLERANCE`` (1e-4 of each
output's scale; see ``ppfr_jax/deploy/onnx.py`` for why), checked at two batch
sizes so the symbolic batch dimension is exercised.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ppfr_jax import checkpoints, deploy, frequency
from ppfr_jax.cli import export as cli_export
from ppfr_jax.cli import protect as cli_protect
from ppfr_jax.cli import verify as cli_verify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import minusface as minusface_config  # noqa: E402

# absolute specs: the CLIs and the fixtures then share deploy's cache (one init per model)
MF_SPEC = os.path.join(ROOT, "configs", "minusface.py") + ":stage2,tiny"
DF_SPEC = os.path.join(ROOT, "configs", "duetface.py") + ":server,tiny"


def _untrained(spec):
    return deploy.cached_deployment(None, spec, True, 0, None, None)


@pytest.fixture(scope="module")
def mf():
    return _untrained(MF_SPEC)


@pytest.fixture(scope="module")
def df():
    return _untrained(DF_SPEC)


@pytest.fixture(scope="module")
def onnx_tools():
    pytest.importorskip("jax2onnx", reason="ONNX export needs jax2onnx (pip install 'ppfr_jax[export]')")
    pytest.importorskip("onnxruntime", reason="the export check needs onnxruntime (pip install 'ppfr_jax[export]')")
    from ppfr_jax.deploy import onnx
    return onnx


@pytest.fixture(scope="module")
def mf_onnx(mf, onnx_tools, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("onnx") / "minusface_client.onnx")
    return path, onnx_tools.export_client(mf, path, batch_sizes=(1, 3))


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Three synthetic 'aligned faces' as PNGs: two different, one a copy of the first."""
    d = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    b = np.clip(a.astype(int)[::-1] + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    for name, img in (("alice_1", a), ("bob_1", b), ("alice_copy", a)):
        Image.fromarray(img).save(d / f"{name}.png")
    return d


# ----------------------------------------------------------------------------- randomness


def test_fresh_permutations_are_valid_and_fresh():
    p, q = deploy.fresh_permutations(4, 2), deploy.fresh_permutations(4, 2)
    assert p.shape == (4, 2, 192) and p.dtype == np.int32
    np.testing.assert_array_equal(np.sort(p, axis=-1), np.broadcast_to(np.arange(192), p.shape))
    assert not np.array_equal(p, q)  # OS entropy on every call (equal with probability ~1/192!^8)
    assert not np.array_equal(p[0, 0], p[0, 1]) and not np.array_equal(p[0, 0], p[1, 0])
    r = lambda: deploy.fresh_permutations(3, rng=np.random.default_rng(5))  # noqa: E731
    np.testing.assert_array_equal(r(), r())  # a Generator makes them reproducible (tests only)
    deploy.check_permutations(p, 4, 2)
    bad = p.copy()
    bad[1, 0, 0] = bad[1, 0, 1]
    with pytest.raises(deploy.DeployError, match="permutation of 0..191"):
        deploy.check_permutations(bad, 4, 2)
    with pytest.raises(deploy.DeployError, match=r"shape \(4, 1, 192\)"):
        deploy.check_permutations(p, 4, 1)


@pytest.mark.slow
def test_minusface_fresh_key_changes_x_p_and_fixed_permutations_repeat(mf):
    img = np.asarray(Image.new("RGB", (112, 112), (90, 120, 200)))[None].repeat(2, 0)
    img[1] = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    x1, x2 = mf.protect(img)["x_p"], mf.protect(img)["x_p"]
    assert x1.shape == (2, 112, 112, 3) and 0.0 <= x1.min() and x1.max() <= 1.0
    assert np.abs(x1 - x2).max() > 0.05  # a fresh permutation per call: a different X_p for the same face
    perms = deploy.fresh_permutations(2)
    y1, y2 = mf.protect(img, perms)["x_p"], mf.protect(img, perms)["x_p"]
    np.testing.assert_array_equal(y1, y2)  # the graph is deterministic given the permutation
    # identity permutations decode the residue unshuffled: a different image again
    ident = np.broadcast_to(np.arange(192, dtype=np.int32), (2, 1, 192))
    assert np.abs(mf.protect(img, ident)["x_p"] - y1).max() > 0.05


def test_minusface_deployment_uses_the_runs_generator_scale(mf):
    # a run trained with generator_scale s protects with s * U(x / s), not U(x)
    cfg = minusface_config.get_config("stage2,tiny")
    cfg.minusface.generator_scale = 4.0
    dep = deploy.load_deployment(config=cfg, untrained=True, seed=0)
    assert dep.model.generator_scale == 4.0 and mf.model.generator_scale == 1.0
    img = np.random.default_rng(2).integers(0, 256, (1, 112, 112, 3), dtype=np.uint8)
    perms = deploy.fresh_permutations(1)
    assert np.abs(dep.protect(img, perms)["x_p"] - mf.protect(img, perms)["x_p"]).max() > 1e-3


# ----------------------------------------------------------------------------- ONNX export


@pytest.mark.slow
def test_minusface_onnx_matches_jax_with_dynamic_batch(mf, mf_onnx, onnx_tools):
    path, report = mf_onnx
    assert set(report["check"]) == {"x_p@1", "x_p@3"}
    for k, v in report["check"].items():
        assert v["max_abs_diff"] <= v["tolerance"], (k, v)
    client = onnx_tools.OnnxClient(path, expect=mf)
    ins = {i.name: i for i in client.session.get_inputs()}
    assert ins["images"].shape == ["B", 112, 112, 3] and ins["permutations"].shape == ["B", 1, 192]
    assert ins["permutations"].type == "tensor(int32)"
    assert client.meta["ppfr.method"] == "minusface" and client.meta["ppfr.client_fingerprint"] == \
        mf.client_fingerprint
    # a batch size the check did not use, and the permutation input really drives the shuffle
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    perms = deploy.fresh_permutations(2, rng=rng)
    got = client.run(images, perms)["x_p"]
    np.testing.assert_allclose(got, mf.protect(images, perms)["x_p"], rtol=0, atol=onnx_tools.TOLERANCE)
    assert np.abs(client.run(images, deploy.fresh_permutations(2))["x_p"] - got).max() > 0.05


@pytest.mark.slow
def test_duetface_onnx_matches_jax_with_dynamic_batch(df, onnx_tools, tmp_path):
    path = str(tmp_path / "duetface_client.onnx")
    report = onnx_tools.export_client(df, path, batch_sizes=(1, 3))
    names = ["server_channels"] + [f"attention_mask_{s}" for s in range(4)]
    assert report["outputs"] == names and report["inputs"] == ["images", "roi_mask"]
    assert set(report["check"]) == {f"{n}@{b}" for n in names for b in (1, 3)}
    for k, v in report["check"].items():
        assert v["max_abs_diff"] <= v["tolerance"], (k, v)
    client = onnx_tools.OnnxClient(path, expect=df)
    outs = {o.name: o.shape for o in client.session.get_outputs()}
    assert outs == {"server_channels": ["B", 112, 112, 162], "attention_mask_0": ["B", 56, 56, 1],
                    "attention_mask_1": ["B", 28, 28, 1], "attention_mask_2": ["B", 14, 14, 1],
                    "attention_mask_3": ["B", 7, 7, 1]}  # nothing else leaves the client
    assert client.meta["ppfr.roi_source"] == "template"
    # the server channels are the DCT's non-client channels of the image, exactly what JAX computes
    images = np.random.default_rng(4).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    got = client.run(images, df.client_extra(images))
    x = (images / 127.5 - 1.0).astype(np.float32)
    server, _ = frequency.split_channels(frequency.dct_transform(x), frequency.SUB_CHS)
    np.testing.assert_allclose(got["server_channels"], np.asarray(server), rtol=0,
                               atol=onnx_tools.TOLERANCE * np.abs(np.asarray(server)).max())
    # an export belongs to its run
    with pytest.raises(deploy.DeployError, match="ppfr.method"):
        onnx_tools.OnnxClient(path, expect=_untrained(MF_SPEC))


def test_export_cli(onnx_tools, tmp_path, capsys):
    out = str(tmp_path / "c.onnx")
    assert cli_export.main(["--method", "minusface", "--config", MF_SPEC, "--untrained", "--out", out]) == 0
    text = capsys.readouterr().out
    assert os.path.isfile(out) and "x_p@1: max |onnx - jax|" in text and "x_p@3" in text
    assert cli_export.main(["--method", "duetface", "--config", MF_SPEC, "--untrained", "--out", out]) == 2
    assert "--method duetface, but" in capsys.readouterr().err
    assert cli_export.main(["--workdir", str(tmp_path / "no_run"), "--out", out]) == 2
    assert "no_run" in capsys.readouterr().err


# ----------------------------------------------------------------------------- ppfr-protect -> ppfr-verify


def _verify(spec, a, b, capsys, *extra):
    rc = cli_verify.main(["--config", spec, "--untrained", str(a), str(b), "--json", *extra])
    assert rc == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_minusface_protect_verify_round_trip(mf, faces, tmp_path, capsys):
    out = tmp_path / "protected"
    assert cli_protect.main(["--method", "minusface", "--config", MF_SPEC, "--untrained",
                             "--images", str(faces), "--out", str(out), "--keep-names"]) == 0
    assert "3 protected file(s)" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == sorted(f"{n}{e}" for n in ("alice_1", "bob_1", "alice_copy")
                                             for e in (".npz", ".xp.png"))
    with np.load(out / "alice_1.npz") as z:
        assert sorted(z.files) == ["meta", "x_p"]  # the protected image and metadata, not the face
        meta = json.loads(str(z["meta"]))
        assert z["x_p"].shape == (112, 112, 3)
    assert meta["method"] == "minusface" and meta["tensors"] == {"x_p": [112, 112, 3]}
    assert meta["client_fingerprint"] == mf.client_fingerprint and "alice" not in json.dumps(meta)
    preview = np.asarray(Image.open(out / "alice_1.xp.png"))
    with np.load(out / "alice_1.npz") as z:
        np.testing.assert_array_equal(preview, np.round(z["x_p"] * 255).astype(np.uint8))
    # the same face protected twice (two fresh permutations) travels as two different X_p
    with np.load(out / "alice_1.npz") as z1, np.load(out / "alice_copy.npz") as z2:
        assert np.abs(z1["x_p"] - z2["x_p"]).max() > 0.05

    same = _verify(MF_SPEC, out / "alice_1.npz", out / "alice_1.npz", capsys)
    assert same["score"] == pytest.approx(1.0, abs=1e-5) and same["same"] is True
    r = _verify(MF_SPEC, out / "alice_1.npz", out / "bob_1.npz", capsys, "--threshold", "2")
    assert -1.0 <= r["score"] <= 1.0 and r["same"] is False and r["threshold_source"] == "--threshold"
    rc = cli_verify.main(["--config", MF_SPEC, "--untrained", str(out / "alice_1.npz"), str(out / "bob_1.npz")])
    text = capsys.readouterr().out
    assert rc == 0 and "cosine" in text and ("same person" in text or "different people" in text)
    assert "default, uncalibrated" in text


def test_duetface_protect_verify_round_trip(df, faces, tmp_path, capsys):
    out = tmp_path / "protected"
    assert cli_protect.main(["--config", DF_SPEC, "--untrained", "--images", str(faces / "alice_1.png"),
                             str(faces / "bob_1.png"), "--out", str(out), "--keep-names"]) == 0
    assert sorted(os.listdir(out)) == ["alice_1.npz", "bob_1.npz"]
    with np.load(out / "alice_1.npz") as z:
        assert sorted(z.files) == ["attention_mask_0", "attention_mask_1", "attention_mask_2", "attention_mask_3",
                                   "meta", "server_channels"]
        assert z["server_channels"].shape == (112, 112, 162) and z["attention_mask_3"].shape == (7, 7, 1)
    same = _verify(DF_SPEC, out / "alice_1.npz", out / "alice_1.npz", capsys)
    assert same["score"] == pytest.approx(1.0, abs=1e-5) and same["method"] == "duetface"
    r = _verify(DF_SPEC, out / "alice_1.npz", out / "bob_1.npz", capsys)
    assert -1.0 <= r["score"] < 1.0 - 1e-6 and r["same"] == (r["score"] >= r["threshold"])


def test_threshold_from_results_json(tmp_path):
    assert cli_verify.resolve_threshold(None, None) == (cli_verify.DEFAULT_THRESHOLD, "default, uncalibrated")
    assert cli_verify.resolve_threshold(str(tmp_path), 0.42)[0] == 0.42
    (tmp_path / "results.json").write_text(json.dumps({"devtest_threshold": 1.2}))
    thr, where = cli_verify.resolve_threshold(str(tmp_path), None)
    assert thr == pytest.approx(0.4) and "devtest_threshold" in where  # squared L2 1.2 <-> cos 0.4
    (tmp_path / "results.json").write_text(json.dumps({"verify_threshold": 0.25, "devtest_threshold": 1.2}))
    assert cli_verify.resolve_threshold(str(tmp_path), None)[0] == 0.25


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_file(mf, faces, tmp_path, capsys):
    good = tmp_path / "p"
    assert cli_protect.main(["--config", MF_SPEC, "--untrained", "--images", str(faces / "alice_1.png"),
                             "--out", str(good), "--no-preview", "--keep-names"]) == 0
    assert os.listdir(good) == ["alice_1.npz"]
    capsys.readouterr()
    ok = str(good / "alice_1.npz")

    def protect_err(*args):
        assert cli_protect.main(["--config", MF_SPEC, "--untrained", "--out", str(tmp_path / "x"), *args]) == 2
        return capsys.readouterr().err

    def verify_err(a, b, spec=MF_SPEC):
        assert cli_verify.main(["--config", spec, "--untrained", str(a), str(b)]) == 2
        return capsys.readouterr().err

    # images: wrong size, missing, not an image, duplicate output names
    Image.new("RGB", (96, 112)).save(tmp_path / "wide.png")
    assert "wide.png: image is 96x112" in protect_err("--images", str(tmp_path / "wide.png"), "--align", "none")
    err = protect_err("--images", str(tmp_path / "wide.png"))  # default: a photo, searched for a face
    assert "wide.png" in err and "no face" in err and "--skip-bad" in err, err
    assert "nope.png: no such file" in protect_err("--images", str(tmp_path / "nope.png"))
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg")
    assert "junk.jpg: cannot decode image" in protect_err("--images", str(tmp_path / "junk.jpg"))
    (tmp_path / "dup").mkdir()
    Image.new("RGB", (112, 112)).save(tmp_path / "dup" / "alice_1.png")
    assert "alice_1.npz" in protect_err("--images", str(faces / "alice_1.png"), str(tmp_path / "dup"), "--keep-names")
    assert cli_protect.main(["--untrained", "--images", str(faces), "--out", str(tmp_path / "x")]) == 2
    assert "--untrained needs --config" in capsys.readouterr().err

    # protected files: missing, corrupt, a plain npz, another method's run, another client, wrong shape
    assert "missing.npz: no such file" in verify_err(ok, tmp_path / "missing.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
    assert "corrupt.npz: not" in verify_err(ok, tmp_path / "corrupt.npz")
    np.savez(tmp_path / "plain.npz", x_p=np.zeros((112, 112, 3), np.float32))
    assert "plain.npz: not a protected file" in verify_err(tmp_path / "plain.npz", ok)
    assert "made by method 'minusface'" in verify_err(ok, ok, spec=DF_SPEC)
    with np.load(ok) as z:
        meta, x_p = json.loads(str(z["meta"])), z["x_p"]
    np.savez(tmp_path / "other.npz", meta=json.dumps({**meta, "client_fingerprint": "0" * 16}), x_p=x_p)
    assert "other.npz: made by a different client" in verify_err(ok, tmp_path / "other.npz")
    np.savez(tmp_path / "shape.npz", meta=json.dumps(meta), x_p=x_p[:56])
    assert "shape.npz: tensor 'x_p' has shape (56, 112, 3)" in verify_err(tmp_path / "shape.npz", ok)

    # runs that cannot be deployed
    with pytest.raises(deploy.DeployError, match="minusface_stage1.*not deployable"):
        deploy.load_deployment(config=minusface_config.get_config("stage1,tiny"), untrained=True)
    with pytest.raises(deploy.DeployError, match="no_run"):
        deploy.load_deployment(str(tmp_path / "no_run"))


# ----------------------------------------------------------------------------- what leaves the client


def test_protected_names_carry_nothing_of_the_input_name(mf, faces, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for f in ("alice_1.png", "bob_1.png"):
        (src / f"Jane_Doe_{f}").write_bytes((faces / f).read_bytes())
    out = tmp_path / "out"
    assert cli_protect.main(["--config", MF_SPEC, "--untrained", "--images", str(src), "--out", str(out)]) == 0
    msg = capsys.readouterr().out
    names = sorted(os.listdir(out))
    assert len(names) == 4 and not any(w in n for n in names for w in ("Jane", "Doe", "alice", "bob", "_1"))
    stems = {n.split(".")[0] for n in names}
    assert len(stems) == 2 and all(len(s) == 16 and int(s, 16) >= 0 for s in stems)
    # the mapping stays on the client: beside --out, never inside it
    manifest = tmp_path / "out.manifest.json"
    assert str(manifest) in msg and "names the people" in msg
    m = json.loads(manifest.read_text())["files"]
    assert sorted(m) == sorted(f"{s}.npz" for s in stems)
    assert sorted(os.path.basename(v) for v in m.values()) == ["Jane_Doe_alice_1.png", "Jane_Doe_bob_1.png"]
    for n in names:
        with open(out / n, "rb") as f:
            assert b"Jane" not in f.read()
    # a second run adds files and entries, never replaces any
    before = {n: (out / n).read_bytes() for n in names}
    assert cli_protect.main(["--config", MF_SPEC, "--untrained", "--images", str(src), "--out", str(out),
                             "--no-preview"]) == 0
    after = sorted(os.listdir(out))
    assert len(after) == 6 and all((out / n).read_bytes() == b for n, b in before.items())
    assert len(json.loads(manifest.read_text())["files"]) == 4
    # the manifest may not be put where it would travel with the files
    assert cli_protect.main(["--config", MF_SPEC, "--untrained", "--images", str(src), "--out", str(out),
                             "--manifest", str(out / "m.json")]) == 2
    assert "inside --out" in capsys.readouterr().err
    # opting in to input names says so in the help
    help_text = deploy_help()
    assert "--keep-names" in help_text and "travels with the protected file" in help_text


def deploy_help():
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        cli_protect.main(["--help"])
    return " ".join(buf.getvalue().split())


def test_existing_files_are_never_overwritten(mf, faces, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--config", MF_SPEC, "--untrained", "--images", str(faces / "alice_1.png"), "--out", str(out),
            "--keep-names"]
    assert cli_protect.main(args) == 0
    first = {n: (out / n).read_bytes() for n in os.listdir(out)}
    capsys.readouterr()
    assert cli_protect.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppfr-protect: error: ") and "already exists" in err[0]
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == first
    # a foreign file where the manifest would go is not replaced either
    (tmp_path / "o2.manifest.json").write_text("my notes")
    assert cli_protect.main(["--config", MF_SPEC, "--untrained", "--images", str(faces / "alice_1.png"),
                             "--out", str(tmp_path / "o2")]) == 2
    assert "not a ppfr-protect manifest" in capsys.readouterr().err
    assert (tmp_path / "o2.manifest.json").read_text() == "my notes"


@pytest.mark.parametrize("case", ["oversized", "huge_header", "out_is_file", "batch_size", "seed", "empty_out"])
def test_every_bad_input_is_one_line(mf, faces, tmp_path, capsys, case):
    from test_image_io import _png_claiming
    args = ["--config", MF_SPEC, "--untrained", "--images", str(faces / "alice_1.png"), "--out", str(tmp_path / "o")]
    if case == "oversized":
        Image.new("RGB", (4000, 3000)).save(tmp_path / "big.png")
        args[4] = str(tmp_path / "big.png")
        args += ["--align", "none"]  # aligned faces only: refused on the header, before decoding
        want = "big.png: image is 4000x3000 (WxH), expected 112x112"
    elif case == "huge_header":
        (tmp_path / "bomb.png").write_bytes(_png_claiming(60000, 60000))
        args[4] = str(tmp_path / "bomb.png")
        want = "bomb.png: image"
    elif case == "out_is_file":
        (tmp_path / "o").write_text("x")
        want = "is not a folder"
    elif case == "batch_size":
        args += ["--batch-size", "0"]
        want = "argument --batch-size: expected an integer >= 1, got 0"
    elif case == "seed":
        args += ["--seed", "-3"]
        want = "argument --seed: expected an integer >= 0, got -3"
    else:
        args[-1] = ""
        want = "--out: empty path"
    try:
        rc = cli_protect.main(args)
    except SystemExit as e:  # argparse's own errors: usage line + "prog: error: ..."
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("usage:") and not ln.startswith(" ")]
    assert len(lines) == 1 and lines[0].startswith("ppfr-protect: error: ") and want in lines[0], err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- trained runs (engine workdirs)


@pytest.mark.slow  # four 2-step training runs (~3 min on 2 cores)
@pytest.mark.parametrize("method", ["minusface", "duetface"])
def test_workdir_export_protect_verify(method, faces, tmp_path, capsys):
    """The real layout: engine checkpoints of the two-stage runs -> ppfr-export / ppfr-protect / ppfr-verify."""
    import duetface as duetface_config

    from ppfr_jax import train

    first, second = str(tmp_path / "first"), str(tmp_path / "run")
    if method == "minusface":
        train.train_and_evaluate(minusface_config.get_config("stage1,tiny"), first)
        train.train_and_evaluate(minusface_config.get_config(f"stage2,tiny,stage1_workdir={first}"), second)
    else:
        train.train_and_evaluate(duetface_config.get_config("client,tiny"), first)
        train.train_and_evaluate(duetface_config.get_config(f"server,tiny,client_workdir={first}"), second)
    capsys.readouterr()
    with pytest.raises(deploy.DeployError, match="not deployable"):
        deploy.load_deployment(first)  # stage 1 / the warm-up alone is not a client/server split
    dep = deploy.load_deployment(second, method=method)
    assert dep.step == 2 and dep.task == ("duetface" if method == "duetface" else "minusface_stage2")
    variables, _ = checkpoints.restore_variables(second)
    if method == "minusface":  # the client is the run's frozen generator, the server its recogniser
        jax.tree.map(np.testing.assert_array_equal, dep.client_variables["params"]["generator"],
                     variables["frozen"]["generator"]["params"])
        jax.tree.map(np.testing.assert_array_equal, dep.server_variables["params"]["recognizer"],
                     variables["params"]["recognizer"])
    else:  # the client is the frozen warm-up client + the attention interfaces, the server the IR net
        jax.tree.map(np.testing.assert_array_equal, dep.client_variables["params"]["client_model"],
                     variables["frozen"]["client_model"]["params"])
        jax.tree.map(np.testing.assert_array_equal, dep.server_variables["batch_stats"]["server_model"],
                     variables["batch_stats"]["duetface"]["server_model"])

    out = tmp_path / "protected"
    assert cli_protect.main(["--method", method, "--workdir", second, "--images", str(faces),
                             "--out", str(out), "--keep-names"]) == 0
    rc = cli_verify.main(["--workdir", second, str(out / "alice_1.npz"), str(out / "bob_1.npz"), "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["method"] == method and -1.0 <= r["score"] <= 1.0 and r["same"] == (r["score"] >= r["threshold"])
    # files from an untrained client of the same config are refused by this run's server
    other = tmp_path / "other"
    spec = MF_SPEC if method == "minusface" else DF_SPEC
    assert cli_protect.main(["--config", spec, "--untrained", "--images", str(faces / "bob_1.png"),
                             "--out", str(other), "--keep-names"]) == 0
    assert cli_verify.main(["--workdir", second, str(out / "alice_1.npz"), str(other / "bob_1.npz")]) == 2
    assert "made by a different client" in capsys.readouterr().err

    if all(importlib.util.find_spec(m) for m in ("jax2onnx", "onnxruntime")):  # the deployed path, via ONNX
        onnx_path = str(tmp_path / "client.onnx")
        assert cli_export.main(["--workdir", second, "--out", onnx_path]) == 0
        assert cli_protect.main(["--workdir", second, "--onnx", onnx_path, "--images", str(faces / "bob_1.png"),
                                 "--out", str(tmp_path / "via_onnx"), "--keep-names"]) == 0
        assert cli_verify.main(["--workdir", second, str(out / "alice_1.npz"),
                                str(tmp_path / "via_onnx" / "bob_1.npz")]) == 0


def test_a_pipeline_config_or_a_bad_variant_is_one_line(tmp_path, capsys):
    """A whole-pipeline config names the stage to deploy; a bad variant argument names the spec (no traceback)."""
    pipe = os.path.join(ROOT, "configs", "duetface.py") + ":tiny"
    assert cli_export.main(["--config", pipe, "--untrained", "--out", str(tmp_path / "c.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppfr-export: error: the config is a whole pipeline"), err
    assert "configs/duetface.py:server,demo" in err[0]
    bad = os.path.join(ROOT, "configs", "minusface.py") + ":stage2,tiny,bogus=1"
    assert cli_export.main(["--config", bad, "--untrained", "--out", str(tmp_path / "c.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ppfr-export: error: --config {bad!r}: "), err
