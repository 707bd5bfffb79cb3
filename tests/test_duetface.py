"""DuetFace: ROI rasterisation, interactive block and full model vs the reference, deployment split, two-stage run.

Tolerances are the golden README's ``suggested_atol`` (10x the reference's own
float32-vs-float64 error), because our float32 convs/DCT sum in a different
order than PyTorch's. For the full model we recompute the DCT from ``x_rgb``
(the golden DCT inputs are stored summarised only), so the rows that include
the DCT's rounding apply, not the ``*_model_only`` ones. Masks are discrete:
exact equality.
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_state_dict, load_golden, suggested_atol
from ppfr_jax import checkpoints, frequency, methods, roi, tasks, train
from ppfr_jax.methods import duetface as duetface_method
from ppfr_jax.models import duetface, pfld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import duetface as duetface_config  # noqa: E402

nhwc = lambda a: jnp.transpose(jnp.asarray(a), (0, 2, 3, 1))
nchw = lambda a: np.transpose(np.asarray(a), (0, 3, 1, 2))


# ----------------------------------------------------------------------------- ROI


def test_landmark_roi_matches_reference_exactly():
    # Three golden sets of landmarks -> the reference's scipy hull masks (float64);
    # on the first set a pixel lies 8.5e-4 px from a hull edge.
    cases = [("landmark_roi", "landmarks", "mask", slice(None)),
             ("duetface_model", "landmarks", "landmark_mask", slice(None)),
             ("interactive_block", "landmarks", "inference_x", slice(0, 2))]
    for name, lm, mask, rows in cases:
        g = load_golden(name)
        ours = np.asarray(roi.landmark_mask(g[lm]))
        np.testing.assert_array_equal(ours, g[mask][rows, 0], err_msg=name)


def _hull_mask_float64(points: np.ndarray) -> np.ndarray:
    """Plain numpy float64 monotone chain + half-plane test (same definition, no scipy)."""
    p = sorted(map(tuple, points.astype(np.float64) * 112))
    cross = lambda o, a, b: (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
    chain = []
    for seq in (p, p[::-1]):
        half = []
        for q in seq:
            while len(half) >= 2 and cross(half[-2], half[-1], q) <= 0:
                half.pop()
            half.append(q)
        chain += half[:-1]
    rr, cc = np.mgrid[0:112, 0:112].astype(np.float64)
    inside = np.ones((112, 112), bool)
    for a, b in zip(chain, chain[1:] + chain[:1]):
        inside &= (b[0] - a[0]) * (rr - a[1]) - (b[1] - a[1]) * (cc - a[0]) >= 0
    return inside


def test_landmark_roi_on_real_faces_matches_float64():
    with np.load(os.path.join(ROOT, "ppfr_jax", "demo_data", "eval", "lfw_devtest_landmarks.npz")) as z:
        lms = z["landmarks"][::125]  # 16 faces
    ours = np.asarray(roi.landmark_mask(lms))
    for i, lm in enumerate(lms):
        np.testing.assert_array_equal(ours[i], _hull_mask_float64(lm), err_msg=f"face {i}")


def test_landmark_roi_boundary_duplicates_and_degenerate_input():
    # 0.5 and 0.75 are exact in float32 and land on pixels 56 and 84: the
    # boundary counts as inside, repeated / collinear / interior points change nothing.
    sq = np.array([[0.5, 0.5], [0.75, 0.5], [0.75, 0.75], [0.5, 0.75]], np.float32)
    extra = np.array([[0.625, 0.5], [0.5, 0.5], [0.6, 0.6], [0.75, 0.625]], np.float32)
    pts = np.concatenate([sq, extra, np.repeat(sq[:1], 90, 0)])[None]  # 98 points
    same = np.full((1, 98, 2), 0.4, np.float32)
    k = np.arange(98)
    line = np.stack([0.5 + k / 256, 0.5 + k / 512], -1)[None].astype(np.float32)  # exactly collinear
    m = np.asarray(roi.landmark_mask(np.concatenate([pts, same, line])))
    want = np.zeros((112, 112), np.float32)
    want[56:85, 56:85] = 1
    np.testing.assert_array_equal(m[0], want)
    assert m[1].sum() == 0 and m[2].sum() == 0  # no hull of positive area: empty ROI
    with pytest.raises(ValueError, match=r"\(B, K, 2\)"):
        roi.landmark_mask(np.zeros((98, 2), np.float32))


def test_template_mask_is_a_symmetric_face_region():
    t = roi.template_mask()
    assert t.shape == (112, 112) and set(np.unique(t)) == {0.0, 1.0}
    np.testing.assert_array_equal(t, t[:, ::-1])  # a flipped face keeps its ROI
    assert 4000 < t.sum() < 6000  # the golden faces' hulls cover 4000-5300 pixels


# ----------------------------------------------------------------------------- interactive block


def test_interactive_block_matches_reference():
    g = load_golden("interactive_block")
    block = duetface.InteractiveBlock()
    interface = {"kernel": np.transpose(g["interface_weight"], (2, 3, 1, 0)), "bias": g["interface_bias"]}
    apply = jax.jit(block.apply)
    for w, tag in ((0.5, "w05"), (0.0, "w0")):
        v = {"params": {"interface": interface, "overlay": {"weight": np.float32(w)}}}
        for lm, r in (("with", nhwc(g["inference_x"])[..., 0]), ("without", None)):
            name = f"out_{tag}_{lm}_landmarks"
            out = apply(v, nhwc(g["main_inputs"]), nhwc(g["embedding_inputs"]), r)
            np.testing.assert_allclose(nchw(out), g[name], rtol=0, atol=suggested_atol("interactive_block", name),
                                       err_msg=name)


def test_empty_roi_gives_sigmoid_not_nan():
    # The reference divides 0 by 0 here; ours yields M = 0, i.e. sigmoid(F), with finite gradients.
    block = duetface.InteractiveBlock()
    x = jax.random.normal(jax.random.key(0), (2, 14, 14, 16))
    feat = jax.random.normal(jax.random.key(1), (2, 7, 7, 8))
    empty = jnp.zeros((2, 112, 112))
    v = block.init(jax.random.key(2), x, feat, empty)
    v = {"params": {**v["params"], "overlay": {"weight": jnp.float32(0.5)}}}
    out = block.apply(v, x, feat, empty)
    np.testing.assert_allclose(out, jax.nn.sigmoid(x), rtol=1e-6)
    g = jax.grad(lambda p: block.apply({"params": p}, x, feat, roi.template_mask()[None].repeat(2, 0)).sum())(
        v["params"])
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(g))


# ----------------------------------------------------------------------------- full model


def test_duetface_model_matches_reference():
    g = load_golden("duetface_model")
    model = duetface_method.build_model("ir18", "mobilefacenet")
    xs, xc = duetface_method.split_input(nhwc(g["x_rgb"]))
    mask = roi.landmark_mask(g["landmarks"])
    target = jax.eval_shape(model.init, jax.random.key(0), xs, xc, mask)

    @jax.jit
    def run(v, xs, xc, mask):
        masks = model.apply(v, xc, mask, method=duetface.DuetFaceModel.client_side)
        return model.apply(v, xs, masks, return_stages=True, method=duetface.DuetFaceModel.server_side)

    last_units = [1, 3, 5, 7]
    for tag in ("w0", "w05"):
        sd = dict(golden_state_dict(f"duetface_model_{tag}"))
        # The reference draws its interface convs inside forward; the golden set recorded them.
        for s, i in enumerate(last_units):
            for leaf in ("weight", "bias"):
                sd[f"server_model.body.{i}.embedding_layer.interface.1.{leaf}"] = g[f"interface_stage{s}_{leaf}"]
        v = duetface.import_torch_state_dict(sd, target, model)
        out, stages = run(v, xs, xc, mask)
        np.testing.assert_allclose(np.asarray(out), g[f"out_{tag}"], rtol=0,
                                   atol=suggested_atol("duetface_model", f"out_{tag}"), err_msg=tag)
        if tag == "w05":
            for s in range(4):
                name = f"iblock_out_w05_stage{s}"
                np.testing.assert_allclose(nchw(stages[s]), g[name], rtol=0,
                                           atol=suggested_atol("duetface_model", name), err_msg=name)


def test_split_channels_slices_match_the_gather():
    """The contiguous-slice split equals an explicit gather of duet_channel_indices, any SUB_CHS."""
    d = np.asarray(jax.random.normal(jax.random.key(0), (2, 3, 3, 192)))
    for sub in (frequency.SUB_CHS, (0, 63), (9, 1), tuple(range(0, 64, 2))):
        main_idx, sub_idx = frequency.duet_channel_indices(sub)
        server, client = frequency.split_channels(d, sub)
        np.testing.assert_array_equal(server, np.take(d, main_idx, axis=-1))
        np.testing.assert_array_equal(client, np.take(d, sub_idx, axis=-1))
        merged = frequency.merge_channels(server, client, sub)
        np.testing.assert_array_equal(merged, d)
        # client=None: the client's frequencies zero in every colour, the rest untouched
        zero_filled = np.asarray(frequency.merge_channels(server, None, sub))
        want = d.copy()
        want[..., sub_idx] = 0.0
        np.testing.assert_array_equal(zero_filled, want)
    # ascending SUB_CHS is merged from slices, not a scatter over the channel axis
    jaxpr = str(jax.make_jaxpr(lambda s: frequency.merge_channels(s, None))(jnp.zeros((1, 2, 2, 162))))
    assert "scatter" not in jaxpr


@pytest.mark.slow
def test_batch_roi_replaces_the_computed_roi(monkeypatch):
    """batch['roi'] (the parity run's recorded mask) is the ROI the loss uses, in place of roi_source's."""
    c = duetface_config.get_config("server,tiny,client_workdir=unused,roi=dataset")
    client = duetface.build_client(c.duetface.client_backbone, 30, c.duetface.client_embedding_size)
    cv = client.init(jax.random.key(3), jnp.zeros((1, 112, 112, 30)), train=False)
    monkeypatch.setattr(checkpoints, "restore_variables", lambda wd, step=None: (
        {"params": {"backbone": cv["params"]}, "batch_stats": {"backbone": cv["batch_stats"]}}, 1))
    task = duetface_method.DuetFaceTask(c, 10)
    images = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    labels = np.array([1, 7], np.int32)
    v = task.init(jax.random.key(0), images, labels)
    params = jax.tree.map(lambda a: a, v["params"])
    for i, layer in enumerate(params["duetface"]["server_model"]):  # w = 0 would hide the mask
        if "embedding_layer" in params["duetface"]["server_model"][layer]:
            params["duetface"]["server_model"][layer]["embedding_layer"]["weight"] = jnp.float32(0.5 + 0.1 * i)
    ms = {k: v[k] for k in v if k != "params"}
    loss = jax.jit(lambda b: task.loss(params, ms, b, jax.random.key(1))[0])
    g = load_golden("landmark_roi")
    lm = np.asarray(g["landmarks"][:2], np.float32)
    by_hand = np.asarray(roi.landmark_mask(lm))[..., None]
    want = loss({"image": images, "label": labels, "landmarks": lm})  # roi_source='dataset' from the landmarks
    with_roi = lambda r: loss({"image": images, "label": labels, "landmarks": lm, "roi": r})
    np.testing.assert_allclose(with_roi(by_hand), want, rtol=1e-6)  # the same mask given: the same loss
    # another mask changes the loss although the landmarks are the same: the batch ROI is the one used
    other = np.broadcast_to(roi.template_mask()[None, ..., None], (2, 112, 112, 1))
    soft = by_hand * np.linspace(0.2, 1.0, 112, dtype=np.float32)[None, None, :, None]
    assert abs(float(with_roi(other)) - float(want)) > 1e-4
    assert abs(float(with_roi(soft)) - float(want)) > 1e-4


# ----------------------------------------------------------------------------- two-stage training


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    """Tiny client warm-up, then tiny server training on it: (client_wd, server_wd, server config)."""
    root = tmp_path_factory.mktemp("duetface")
    client_wd, server_wd = str(root / "client"), str(root / "server")
    r1 = train.train_and_evaluate(duetface_config.get_config("client,tiny"), client_wd)
    assert r1["steps"] == 2 and r1["task"] == "duetface_client"
    c2 = duetface_config.get_config(f"server,tiny,client_workdir={client_wd}")
    r2 = train.train_and_evaluate(c2, server_wd)
    assert r2["steps"] == 2 and r2["task"] == "duetface"
    return client_wd, server_wd, c2


def test_server_stage_refuses_without_client_checkpoint(tmp_path):
    c = duetface_config.get_config("server,tiny")
    with pytest.raises(duetface_method.ClientCheckpointNotFound,
                       match=r"python -m ppfr_jax\.main --config configs/duetface\.py:client,tiny --workdir"):
        train.train_and_evaluate(c, str(tmp_path / "a"))
    c = duetface_config.get_config(f"server,tiny,client_workdir={tmp_path / 'nothing_here'}")
    with pytest.raises(duetface_method.ClientCheckpointNotFound, match="no checkpoint under"):
        train.train_and_evaluate(c, str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "b" / "checkpoints" / "2")


@pytest.mark.slow  # shares one two-stage run (~1-2 min on 2 cores)
def test_two_stage_run_keeps_client_frozen(two_stage):
    client_wd, server_wd, _ = two_stage
    v1, _ = checkpoints.restore_variables(client_wd)
    v2, step = checkpoints.restore_variables(server_wd)
    assert step == 2
    frozen = v2["frozen"]["client_model"]
    for col, got in (("params", frozen["params"]), ("batch_stats", frozen["batch_stats"])):
        want = v1["params"]["backbone"] if col == "params" else v1["batch_stats"]["backbone"]
        jax.tree.map(np.testing.assert_array_equal, got, want)
    # ... while the server side did train: the interactive blocks' w left 0
    w = [float(v2["params"]["duetface"]["server_model"][f"body_{i}"]["embedding_layer"]["weight"]) for i in range(4)]
    assert any(x != 0.0 for x in w), w
    assert set(v2["params"]["duetface"]) == {"server_model", "attention_0", "attention_1", "attention_2",
                                             "attention_3"}


@pytest.mark.slow  # shares one two-stage run (~1-2 min on 2 cores)
def test_deployment_split_sends_only_server_channels_and_masks(two_stage):
    _, server_wd, config = two_stage
    task = methods.make_task(config, 10, 128)
    variables, _ = checkpoints.restore_variables(server_wd)
    images = np.random.default_rng(0).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)

    # the contract (methods.METHODS): each half reads only its own variables
    split = task.split
    assert isinstance(split, methods.METHODS["duetface"])
    client_vars, server_vars = split.split_variables(variables)
    assert set(client_vars["params"]) == {"client_model", "attention_0", "attention_1", "attention_2",
                                          "attention_3"}
    assert set(server_vars["params"]) == {"server_model"}
    r = task.roi_mask(variables, tasks.normalize_images(images), None, task.eval_roi_source)
    sent = jax.jit(split.client_fn)(client_vars, images, r)
    assert set(sent) == set(split.output_names)
    xs, xc = duetface_method.split_input(images)
    np.testing.assert_allclose(sent["server_channels"], xs, rtol=1e-5, atol=1e-4)  # jit fuses the DCT differently
    assert [sent[f"attention_mask_{s}"].shape for s in range(4)] == [(4, 56, 56, 1), (4, 28, 28, 1),
                                                                     (4, 14, 14, 1), (4, 7, 7, 1)]
    leaves = jax.tree.leaves(sent)
    assert len(leaves) == 5  # nothing else travels: no client channels, image or landmarks
    assert all(leaf.shape[-1] not in (3, xc.shape[-1]) for leaf in leaves)

    # the server needs nothing of the client's
    emb = jax.jit(split.server_fn)(server_vars, sent)
    full = jax.jit(task.embed)(variables, images)
    np.testing.assert_allclose(np.asarray(emb), np.asarray(full), rtol=0, atol=1e-5)


@pytest.mark.slow  # shares one two-stage run (~1-2 min on 2 cores)
def test_roi_sources(two_stage, tmp_path):
    client_wd, _, config = two_stage
    # 'pfld': a frozen PFLD in the graph, weights from an Orbax dir (as `ppfr-import --model pfld` writes)
    import orbax.checkpoint as ocp
    pv = pfld.import_torch_state_dict(golden_state_dict("pfld"), pfld.init_variables(pfld.PFLDInference()))
    with ocp.StandardCheckpointer() as ck:
        ck.save(str(tmp_path / "pfld"), pv)
    c = duetface_config.get_config(f"server,tiny,client_workdir={client_wd},roi=pfld,pfld={tmp_path / 'pfld'}")
    task = methods.make_task(c, 10, 128)
    x = jax.random.uniform(jax.random.key(0), (2, 112, 112, 3), minval=-1, maxval=1)
    got = jax.jit(functools.partial(task.roi_mask, source="pfld"))({"frozen": task.frozen}, x)
    _, lm = pfld.PFLDInference().apply(pv, x * 0.5 + 0.5)
    np.testing.assert_array_equal(got, roi.landmark_mask(lm.reshape(2, 98, 2)))

    # 'dataset' reads batch['landmarks'] and says what to do when there are none
    c = duetface_config.get_config(f"server,tiny,client_workdir={client_wd},roi=dataset")
    task = methods.make_task(c, 10, 128)
    assert task.eval_roi_source == "template"  # verification sets carry no landmarks
    g = load_golden("landmark_roi")
    np.testing.assert_array_equal(task.roi_mask({}, x, g["landmarks"]), g["mask"][:, 0])
    with pytest.raises(ValueError, match="data.landmarks"):
        task.roi_mask({}, x, None)
    with pytest.raises(ValueError, match="roi_source"):
        duetface_method.DuetFaceTask(duetface_config.get_config(f"server,tiny,client_workdir={client_wd},roi=nose"), 10)


def test_config_variants():
    with pytest.raises(ValueError, match="client"):
        duetface_config.get_config("ir50")
    c = duetface_config.get_config("server,ir50")
    assert (c.task, c.model.backbone, c.duetface.roi_source) == ("duetface", "ir50", "pfld")
    assert c.duetface.client_workdir == "runs/duetface_client_ir50"
    c = duetface_config.get_config("client,demo")
    assert (c.task, c.model.backbone, c.data.landmarks) == ("duetface_client", "mobilefacenet_tiny", True)
    assert c.model.embedding_size == c.duetface.client_embedding_size
    c = duetface_config.get_config("server,demo")
    assert c.duetface.roi_source == "dataset" and c.data.landmarks
