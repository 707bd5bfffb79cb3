"""MinusFace: golden parity (stage-1 forward, losses, stage-2 shuffle) and a tiny stage 1 -> stage 2 run.

Tolerances are the golden README's ``suggested_atol`` (10x the float32-vs-
float64 error the reference itself carries for that output), rtol 0: our
float32 DCT/convs sum in another order than PyTorch, so agreement can only be
expected within the rounding the reference already has.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_summarised_close, golden_state_dict, load_golden, suggested_atol
from ppfr_jax import checkpoints, config_lib, frequency, losses, methods, tasks, train
from ppfr_jax.methods import minusface as minusface_method
from ppfr_jax.models import minusface

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import minusface as minusface_config  # noqa: E402


def _nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def _nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


# ----------------------------------------------------------------------------- golden parity


@pytest.mark.slow
def test_generator_scale_is_a_reparametrisation():
    # g(x) = s * U(x / s): with U's first-layer kernels scaled by s and its last layer by 1/s, the
    # scaled generator computes exactly the reference's function (scale 1)
    m1 = minusface_method.build_model("stage1", backbone="ir_tiny", generator_widths=(4, 8), embedding_size=8)
    ms = minusface_method.build_model("stage1", backbone="ir_tiny", generator_widths=(4, 8), embedding_size=8,
                               generator_scale=256.0)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 112, 112, 3)), jnp.float32)
    v = jax.jit(lambda r: m1.init(r, x, key=r))(jax.random.key(0))
    g = jax.tree.map(np.array, v["params"]["generator"])
    g["left_conv_1"]["conv_ReLU_0"]["kernel"] *= 256.0  # (kernel * s) on x / s: the same pre-activation
    g["right_conv_2"]["kernel"] /= 256.0  # the last (1x1) conv of a 2-level U-Net
    g["right_conv_2"]["bias"] /= 256.0
    res = lambda m, gv: m.apply({"params": {"generator": gv}}, x, method=minusface.MinusBackbone.residue)
    a, b = jax.jit(lambda: (res(m1, v["params"]["generator"]), res(ms, g)))()
    np.testing.assert_allclose(np.asarray(b["x_encode_up"]), np.asarray(a["x_encode_up"]), rtol=1e-4, atol=1e-3)


def test_stage1_forward_matches_reference():
    # The whole reference MinusBackbone state_dict goes through our one import
    # (generator.backbone.* and recognizer.*), then the module's forward.
    g = load_golden("minusface_stage1")
    model = minusface_method.build_model("stage1", backbone="ir18")
    variables = minusface.import_torch_state_dict(golden_state_dict("minusface_stage1"),
                                                  minusface.init_variables(model))
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, _nhwc(g["x"]))
    out = {k: _nchw(v) if v.ndim == 4 else np.asarray(v) for k, v in out.items()}
    tol = lambda k: suggested_atol("minusface_stage1", k)  # noqa: E731
    for name in ("x_encode", "x_residue", "x_feature", "x_latent"):
        np.testing.assert_allclose(out[name], g[name], rtol=0, atol=tol(name), err_msg=name)
    for name in ("x_up", "x_encode_up", "x_residue_up"):
        assert_summarised_close(g, name, out[name], atol=tol(name))


def test_objective_matches_reference_losses():
    lg = load_golden("losses")
    x, x_enc, latent = _nhwc(lg["x"]), _nhwc(lg["x_encode"]), _nhwc(lg["latent"])
    logits, labels = jnp.asarray(lg["logits"]), jnp.asarray(lg["labels"])
    task = methods.make_task(minusface_config.get_config("stage1,tiny"), 10)
    out = task.objective(x, x_enc, latent, logits, labels)
    for k in ("loss", "loss_gen", "loss_fr", "loss_ls"):
        # a 0-d loss has an exactly-zero tolerance row for loss_ls; 1e-7 is float32 rounding of the sum
        np.testing.assert_allclose(float(out[k]), lg[k], rtol=0, atol=max(suggested_atol("losses", k), 1e-7),
                                   err_msg=k)
    # stage 2 trains the recogniser only: the reference zeroes gen and spar
    w2 = minusface_method.MinusFaceStage2.objective_weights(minusface_config.get_config("stage2,tiny"))
    assert w2 == {"gen": 0.0, "fr": 1.0, "spar": 0.0}
    toy = methods.make_task(minusface_config.get_config("toy,tiny"), 10)
    t = toy.objective(x, x_enc, latent, logits, labels)
    np.testing.assert_allclose(float(t["loss"]), lg["loss_gen"] + lg["loss_fr"], rtol=0, atol=2e-5)
    # configurable weights
    c = minusface_config.get_config("stage1,tiny")
    c.minusface.loss_weights.gen = 1.0
    t1 = methods.make_task(c, 10).objective(x, x_enc, latent, logits, labels)
    np.testing.assert_allclose(float(t1["loss_gen"]), lg["l1_raw"], rtol=0, atol=suggested_atol("losses", "l1_raw"))


def _zero_generator_stage2():
    """Stage-2 model whose generator outputs 0, so its residue is dct(x) itself."""
    model = minusface_method.build_model("stage2", backbone="ir_tiny", embedding_size=32,
                                  generator_widths=minusface_config.TINY_WIDTHS)
    shapes = minusface.init_variables(model)
    gen = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"]["generator"])
    return model, {"params": {"generator": gen}}


def test_protect_with_recorded_permutation_matches_reference():
    # client path of stage 2 with the reference's torch.randperm injected:
    # protect(x) = idct(shuffle(dct(x) - g(dct(x)))) with g == 0
    g = load_golden("dct")
    model, client_vars = _zero_generator_stage2()
    x_p = jax.jit(lambda v, x, p: model.apply(v, x, perms=p, method=minusface.MinusBackbone.protect))(
        client_vars, _nhwc(g["x"]), jnp.asarray(g["shuffle_perm"], jnp.int32))
    assert x_p.shape == (1, 112, 112, 3)
    np.testing.assert_allclose(_nchw(x_p), g["idct_of_shuffled"], rtol=0,
                               atol=suggested_atol("dct", "idct_of_shuffled"))


def test_permutations_follow_frequency_shuffle_decode():
    # our draw reproduces frequency.shuffle_decode's (same key -> same X_p); shapes checked without compute
    key = jax.random.key(3)
    p = frequency.draw_permutations(key, 4, n_duplicate=2)
    assert p.shape == (2, 4, 192)
    for d, k in enumerate(jax.random.split(key, 2)):
        np.testing.assert_array_equal(np.asarray(p[d]), np.asarray(frequency.random_permutations(k, 4)))
    assert all(sorted(row) == list(range(192)) for row in np.asarray(p).reshape(-1, 192))
    with pytest.raises(ValueError, match="perms must be"):
        frequency.shuffle_decode(jnp.zeros((2, 112, 112, 192)), perms=jnp.zeros((2, 3, 192), jnp.int32))


# ----------------------------------------------------------------------------- configs, tasks


def test_configs_and_tasks(tmp_path):
    from ppfr_jax.demo_data import demo_paths
    for name in config_lib.PAPER_EVAL_SETS:  # the paper configs verify on the five benchmarks under eval.root
        os.symlink(demo_paths()["eval_bin"], tmp_path / name)
    for arg in ("stage1", "stage1,ir50", "stage2,ir50", "toy", "stage1,demo", "stage2,demo", "toy,demo",
                "stage2,tiny,n_duplicate=2", "stage1,num_aug=1"):
        c = minusface_config.get_config(arg)
        if c.eval.sets:
            c.eval.root = str(tmp_path)
        config_lib.validate(c)
        assert c.task.startswith("minusface_")
    paper = minusface_config.get_config("stage2,ir50")
    # the reference lists each image NUM_AUG=3 times per epoch: the schedule is stretched by 3
    assert paper.minusface.num_aug == 3 and paper.num_epochs == 72
    assert tuple(paper.optim.boundaries_epochs) == (30, 54, 66)
    assert minusface_config.get_config("stage1").optim.lr_multipliers.generator == 0.1
    with pytest.raises(ValueError, match="stage1, stage2, toy"):
        minusface_config.get_config("stage1,stage2")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="generator_scale must be a finite number > 0"):
            minusface_method.build_model("stage1", backbone="ir_tiny", generator_widths=(4, 8), generator_scale=bad)

    task = methods.make_task(minusface_config.get_config("stage1,tiny"), 10)
    shapes = jax.eval_shape(task.init, jax.random.key(0), jnp.zeros((2, 112, 112, 3), jnp.uint8),
                            jnp.zeros((2,), jnp.int32))
    assert set(shapes["params"]) == {"generator", "recognizer", "head"}
    assert shapes["params"]["recognizer"]["input_layer_0"]["kernel"].shape[2] == 192
    groups = {task.param_group(("generator", "left_conv_1")), task.param_group(("recognizer", "x")),
              task.param_group(("head", "kernel"))}
    assert groups == {"generator", "default"}

    # toy: U-Net on RGB, recogniser on X - g(X); a traced loss with the metrics the engine logs
    toy = methods.make_task(minusface_config.get_config("toy,tiny"), 10)
    tv = jax.eval_shape(toy.init, jax.random.key(0), jnp.zeros((2, 112, 112, 3), jnp.uint8),
                        jnp.zeros((2,), jnp.int32))
    assert tv["params"]["generator"]["left_conv_1"]["conv_ReLU_0"]["kernel"].shape[2] == 3
    batch = {"image": jnp.zeros((2, 112, 112, 3), jnp.uint8), "label": jnp.zeros((2,), jnp.int32)}
    loss, (metrics, _) = jax.eval_shape(
        lambda v: toy.loss(v["params"], {k: v[k] for k in v if k != "params"}, batch, jax.random.key(1)), tv)
    assert loss.shape == () and {"loss", "loss_gen", "loss_fr", "accuracy"} <= set(metrics)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_stage1_then_stage2_end_to_end(tmp_path):
    s1 = str(tmp_path / "stage1")
    s2 = str(tmp_path / "stage2")

    # stage 2 refuses to start without a stage-1 checkpoint, and says how to make one
    for wd in ("", str(tmp_path / "nothing_here")):
        c = minusface_config.get_config(f"stage2,tiny,stage1_workdir={wd}" if wd else "stage2,tiny")
        with pytest.raises(minusface_method.Stage1CheckpointNotFound, match=r"configs/minusface\.py:stage1,tiny"):
            train.train_and_evaluate(c, str(tmp_path / "refused"))

    r1 = train.train_and_evaluate(minusface_config.get_config("stage1,tiny"), s1)
    assert r1["steps"] == 2 and os.path.exists(os.path.join(s1, "results.json"))
    v1, step1 = checkpoints.restore_variables(s1)
    assert step1 == 2

    # the frozen generator computes scale * U(x / scale): stage 2 must use stage 1's scale
    bad = minusface_config.get_config(f"stage2,tiny,stage1_workdir={s1}")
    bad.minusface.generator_scale = 4.0
    with pytest.raises(ValueError, match=r"generator_scale=4\.0 does not match the stage-1 run"):
        methods.make_task(bad, 10)

    c2 = minusface_config.get_config(f"stage2,tiny,stage1_workdir={s1}")
    r2 = train.train_and_evaluate(c2, s2)
    res = json.load(open(os.path.join(s2, "results.json")))
    assert r2["steps"] == 2 and res["task"] == "minusface_stage2"
    v2, _ = checkpoints.restore_variables(s2)
    # the frozen generator is bit-for-bit stage 1's, kept outside the parameters (as DuetFace's client); the new
    # recogniser takes 3-channel X_p
    assert "generator" not in v2["params"]
    jax.tree.map(np.testing.assert_array_equal, v2["frozen"]["generator"]["params"], v1["params"]["generator"])
    assert v2["params"]["recognizer"]["input_layer_0"]["kernel"].shape[2] == 3

    # deployment split (the contract, methods.METHODS): the client holds only g, the server only f_p
    task = methods.make_task(c2, 10)
    split = task.split
    assert isinstance(split, methods.METHODS["minusface"])
    client, server = split.split_variables(v2)
    assert set(client["params"]) == {"generator"} and set(server["params"]) == {"recognizer"}
    images = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)

    both = {"params": {**client["params"], **server["params"]}, "batch_stats": server["batch_stats"]}
    draw = lambda k: jnp.swapaxes(frequency.draw_permutations(k, 2, 1), 0, 1)  # noqa: E731  (B, 1, 192)

    @jax.jit
    def deploy(client, server, both, images, k1, k2):
        a, b = split.client_fn(client, images, draw(k1)), split.client_fn(client, images, draw(k2))
        return a["x_p"], b["x_p"], split.server_fn(server, a), task.embed(both, images)

    k1, k2 = jax.random.split(jax.random.key(7))
    xa, xb, emb, emb_eval = deploy(client, server, both, images, k1, k2)
    assert xa.shape == (2, 112, 112, 3) and emb.shape == (2, 32) and emb_eval.shape == (2, 32)
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    assert float(jnp.abs(xa - xb).max()) > 0.1  # a fresh key gives a fresh protection
    assert bool(jnp.isfinite(emb).all()) and bool(jnp.isfinite(emb_eval).all())

    # verification shuffles belong to the image, not to its place in the batch, and survive a mirror
    p = np.asarray(task.eval_permutations(images))
    assert p.shape == (1, 2, 192) and not np.array_equal(p[0, 0], p[0, 1])
    np.testing.assert_array_equal(np.asarray(task.eval_permutations(images[::-1])), p[:, ::-1])
    np.testing.assert_array_equal(np.asarray(task.eval_permutations(images[:, :, ::-1])), p)

    # recorded permutations in the batch (bench/train_parity.py) replace the per-step draw: the loss
    # no longer depends on the step's rng, and equals the one computed from those permutations by hand
    perms = np.stack([np.random.default_rng(s).permutation(192) for s in range(2)])[:, None]  # (B, 1, 192)
    batch = {"image": images, "label": np.array([1, 2], np.int32), "perms": perms.astype(np.int32)}
    ms = {"batch_stats": v2["batch_stats"], "frozen": v2["frozen"]}
    width = v2["params"]["head"]["kernel"].shape[1]  # the engine pads the class axis
    task = methods.make_task(c2, 10, width)
    loss_fn = jax.jit(lambda b, k: task.loss(v2["params"], ms, b, k, train=False)[0])
    l1, l2 = float(loss_fn(batch, jax.random.key(1))), float(loss_fn(batch, jax.random.key(2)))
    assert l1 == l2
    sent = task.split.client_fn(client, images, perms)
    (logits, _) = task.head.apply({"params": v2["params"]["head"]}, task.split.server_fn(server, sent),
                                  batch["label"])
    np.testing.assert_allclose(l1, float(losses.softmax_cross_entropy(logits, batch["label"])), rtol=1e-5)
    assert float(loss_fn(dict(batch, perms=perms[::-1].copy()), jax.random.key(1))) != l1

    # the demo report reads both runs: regeneration / residue / X_p quality, accuracies, a picture
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import minusface_demo
    rep = minusface_demo.report(s1, s2, out_dir=str(tmp_path / "report"), n_images=4)
    assert rep["images"] == 4 and rep["stage1_steps"] == 2 and rep["stage2_steps"] == 2
    for k in ("regeneration_psnr", "residue_psnr", "xp_psnr"):
        assert np.isfinite(rep[k]) and 0 < rep[k] <= 100, (k, rep[k])
    assert 3 / 192 <= rep["residue_top3_share"] <= 1 and 1 <= rep["residue_effective_channels"] <= 192
    assert os.path.getsize(rep["grid"]) > 1000


@pytest.mark.slow
def test_toy_trains_end_to_end(tmp_path):
    # toy mode: U-Net on RGB, recogniser on X - g(X); a real (tiny) run through the engine
    wd = str(tmp_path / "toy")
    r = train.train_and_evaluate(minusface_config.get_config("toy,tiny"), wd)
    res = json.load(open(os.path.join(wd, "results.json")))
    assert r["steps"] == 2 and res["task"] == "minusface_toy"
    v, step = checkpoints.restore_variables(wd)
    assert step == 2
    assert v["params"]["generator"]["left_conv_1"]["conv_ReLU_0"]["kernel"].shape == (3, 3, 3, 4)  # RGB in
    assert v["params"]["recognizer"]["input_layer_0"]["kernel"].shape[2] == 3
    # the trained toy generator's protection: X - g(X), RGB, finite
    task = methods.make_task(minusface_config.get_config("toy,tiny"), 10)
    images = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    client = {"params": {"generator": v["params"]["generator"]}}
    r = jax.jit(lambda v, x: task.model.apply(v, tasks.normalize_images(x), method=minusface.MinusBackbone.protect))(
        client, images)
    assert r.shape == (2, 112, 112, 3) and bool(jnp.isfinite(r).all())
