"""Weight import: torch_to_flax errors, the CASIA MobileFaceNet, and the ``ppfr-import`` CLI.

Weights travel as exact copies (transposes only), so imported arrays are
compared with ``assert_array_equal``. The CASIA checks on real faces use loose
similarity thresholds (a flip of a face must stay the same face); the
observed values are ~0.95 for flips, ~0.7-0.8 for the same person and ~0.1-0.16
for different people.
"""
from __future__ import annotations

import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppfr_jax import checkpoint_import as ci
from ppfr_jax.cli import import_weights as import_cli
from ppfr_jax.checkpoint_import import CheckpointMismatchError, torch_to_flax
from ppfr_jax.models import mobilefacenet_casia as casia
from ppfr_jax.models.layers import PReLU, batch_norm, conv, dense
from test_torch_pickle import write_torch_zip

CASIA = "data/models/mobilefacenet_casia_xiaoccer/068.ckpt"


# ------------------------------------------------------------------ Flax -> torch layout (test only)

_LEAF = {("params", "kernel"): "weight", ("params", "bias"): "bias", ("params", "scale"): "weight",
         ("params", "alpha"): "weight", ("batch_stats", "mean"): "running_mean",
         ("batch_stats", "var"): "running_var"}


def flax_to_torch(variables) -> collections.OrderedDict:
    """The inverse of torch_to_flax's default table: what torch's state_dict would hold."""
    sd = collections.OrderedDict()

    def walk(tree, path):
        for k, v in tree.items():
            if isinstance(v, dict) or hasattr(v, "items"):
                walk(v, path + (k,))
                continue
            col, mods = path[0], path[1:]
            tmod = ".".join(re.sub(r"_(\d+)$", r".\1", m) for m in mods)
            a = np.asarray(v)
            if k == "kernel":
                a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
            sd[f"{tmod}.{_LEAF[(col, k)]}"] = np.ascontiguousarray(a)
            if (col, k) == ("batch_stats", "var"):
                sd[f"{tmod}.num_batches_tracked"] = np.array(10, np.int64)

    walk(variables, ())
    return sd


class Tiny(nn.Module):
    """torch: features = Sequential(Conv2d(3,4,3,p=1), BatchNorm2d(4), PReLU(4)); fc = Linear(4*4*4, 5)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = conv(4, 3, 1, 1, name="features_0")(x)
        x = batch_norm(train, name="features_1")(x)
        x = PReLU(name="features_2")(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        return dense(5, name="fc")(x)


@pytest.fixture(scope="module")
def tiny():
    model = Tiny()
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
    rng = np.random.default_rng(0)
    # abs: running_var must be positive; values are only copied here, never used in a forward
    variables = jax.tree.map(lambda s: np.abs(rng.standard_normal(s.shape)).astype(np.float32), dict(shapes))
    return model, variables, flax_to_torch(variables)


def test_tiny_round_trip(tiny):
    model, variables, sd = tiny
    assert set(sd) == {"features.0.weight", "features.1.weight", "features.1.bias", "features.2.weight",
                       "fc.weight", "fc.bias", "features.1.running_mean", "features.1.running_var",
                       "features.1.num_batches_tracked"}
    assert sd["features.0.weight"].shape == (4, 3, 3, 3) and sd["fc.weight"].shape == (5, 64)
    out = torch_to_flax(sd, jax.eval_shape(lambda: variables))
    jax.tree.map(np.testing.assert_array_equal, out, variables)


def test_missing_key_is_named(tiny):
    _, variables, sd = tiny
    sd = dict(sd)
    del sd["features.1.running_mean"]
    with pytest.raises(CheckpointMismatchError, match=r"(?s)missing.*features[._]1\.running_mean"):
        torch_to_flax(sd, variables)


def test_extra_key_is_named(tiny):
    _, variables, sd = tiny
    sd = {**sd, "head.kernel_extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointMismatchError, match=r"(?s)unexpected.*head\.kernel_extra\.weight"):
        torch_to_flax(sd, variables)
    # unless it is declared ignorable
    torch_to_flax(sd, variables, ignore=(r"^head\.",))


def test_misshaped_key_is_named(tiny):
    _, variables, sd = tiny
    sd = {**sd, "fc.weight": np.zeros((5, 63), np.float32)}
    with pytest.raises(CheckpointMismatchError, match=r"(?s)shape mismatch.*fc\.weight.*\(5, 63\)"):
        torch_to_flax(sd, variables)


def test_all_problems_reported_at_once(tiny):
    _, variables, sd = tiny
    sd = dict(sd)
    del sd["features.0.weight"]
    sd["extra.weight"] = np.zeros(1, np.float32)
    sd["features.2.weight"] = np.zeros(5, np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        torch_to_flax(sd, variables)
    # a missing key is named in canonical form (features_0): torch's own spelling of
    # an absent key is unknowable, features.0 and features_0 map to the same Flax module
    for name in (r"features[._]0\.weight", r"extra\.weight", r"features\.2\.weight: checkpoint shape \(5,\)"):
        assert re.search(name, str(e.value)), name


# ------------------------------------------------------------------ CASIA MobileFaceNet

_LFW = ["Aaron_Peirsol/Aaron_Peirsol_0001.jpg", "Aaron_Peirsol/Aaron_Peirsol_0002.jpg",
        "George_W_Bush/George_W_Bush_0001.jpg", "George_W_Bush/George_W_Bush_0002.jpg"]


@pytest.fixture(scope="module")
def casia_loaded(shared_dir):
    return casia.load_casia_mobilefacenet(shared_dir / CASIA)


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_casia_loads_and_embeds_faces(shared_dir, casia_loaded):
    from PIL import Image

    model, variables = casia_loaded
    # the fixed deep-funneled crop of PROVENANCE.md section 4 (no landmarks needed)
    faces = np.stack([np.asarray(Image.open(shared_dir / "data/lfw/lfw-deepfunneled" / f).convert("RGB")
                                 .crop((77, 69, 173, 181))) for f in _LFW])
    noise = jax.random.uniform(jax.random.key(0), (2, 112, 96, 3), minval=-1, maxval=1)
    x = jnp.concatenate([casia.preprocess(faces), noise])
    # one jit: each image and its flip, as the reference evaluation does
    emb = np.asarray(jax.jit(lambda v, b: casia.embed_with_flip(model, v, b))(variables, x))
    assert emb.shape == (6, 256) and np.isfinite(emb).all()
    e, flipped = _unit(emb[:4, :128]), _unit(emb[:4, 128:])
    assert ((e * flipped).sum(-1) > 0.5).all(), (e * flipped).sum(-1)
    sim = e @ e.T
    same = [sim[0, 1], sim[2, 3]]
    different = [sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3]]
    assert min(same) > max(different) + 0.2, sim


def test_casia_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match=r"\(N, 112, 96, 3\)"):
        jax.eval_shape(casia.CasiaMobileFaceNet().init, jax.random.key(0), jnp.zeros((1, 112, 112, 3)))


# ------------------------------------------------------------------ ppfr-import CLI

def _restore(path):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return jax.tree.map(np.asarray, ckptr.restore(path))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(dict(a)) == jax.tree.structure(dict(b))
    jax.tree.map(np.testing.assert_array_equal, dict(a), dict(b))


def test_cli_casia_real_checkpoint(shared_dir, casia_loaded, tmp_path, capsys):
    out = tmp_path / "casia"
    rc = import_cli.main(["--pth", str(shared_dir / CASIA), "--model", "casia_mobilefacenet", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "333 tensors" in text and "1,019,186 values" in text and str(out) in text
    _assert_trees_equal(_restore(out), jax.tree.map(np.asarray, casia_loaded[1]))


def test_cli_casia_hand_made_zip(tmp_path, capsys):
    # A zip-format .pth of this architecture with random weights, as torch.save(model.state_dict()) writes it.
    target = casia.init_variables()
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: np.abs(rng.standard_normal(s.shape)).astype(np.float32), target)
    sd = flax_to_torch(variables)
    pth = write_torch_zip(tmp_path / "casia.pth", collections.OrderedDict(("module." + k, v) for k, v in sd.items()))
    out = tmp_path / "ckpt"
    assert import_cli.main(["--pth", str(pth), "--model", "casia_mobilefacenet", "--out", str(out)]) == 0
    _assert_trees_equal(_restore(out), variables)
    # refuses to overwrite, then does with --force
    assert import_cli.main(["--pth", str(pth), "--model", "casia_mobilefacenet", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert import_cli.main(["--pth", str(pth), "--model", "casia_mobilefacenet", "--out", str(out), "--force"]) == 0


def test_cli_pfld_golden_weights_zip(tmp_path):
    pfld = pytest.importorskip("ppfr_jax.models.pfld")
    from conftest import golden_state_dict

    sd = collections.OrderedDict(golden_state_dict("pfld"))
    # wrapped the way training scripts save, under a prefix selected with --prefix
    pth = write_torch_zip(tmp_path / "pfld.pth", {"epoch": 7, "state_dict": collections.OrderedDict(
        ("pfld_backbone." + k, v) for k, v in sd.items())})
    out = tmp_path / "pfld_ckpt"
    assert import_cli.main(["--pth", str(pth), "--model", "pfld", "--out", str(out), "--prefix", "pfld_backbone."]) == 0
    restored = _restore(out)
    np.testing.assert_array_equal(restored["params"]["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(restored["params"]["fc"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(restored["batch_stats"]["bn1"]["var"], sd["bn1.running_var"])
    _, _, target, _ = ci.build_import_target("pfld")
    _assert_trees_equal(restored, pfld.import_torch_state_dict(sd, target))


def test_cli_errors(tmp_path, capsys):
    pth = write_torch_zip(tmp_path / "w.pth", {"fc.weight": np.zeros((2, 2), np.float32)})
    out = str(tmp_path / "o")
    assert import_cli.main(["--pth", str(pth), "--model", "nope", "--out", out]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err

    assert import_cli.main(["--pth", str(pth), "--model", "casia_mobilefacenet", "--out", out]) == 2
    err = capsys.readouterr().err
    # missing keys (shortened per section) and the unexpected key, named
    assert "blocks_0.conv_1.running_mean" in err and "more" in err and "unexpected keys" in err
    assert "\n  fc.weight" in err

    assert import_cli.main(["--pth", str(tmp_path / "absent.pth"), "--model", "casia_mobilefacenet", "--out", out]) == 2
    assert "absent.pth" in capsys.readouterr().err
    assert import_cli.main(["--pth", str(pth), "--model", "casia_mobilefacenet", "--out", out, "--prefix", "x."]) == 2
    assert "--prefix 'x.'" in capsys.readouterr().err
