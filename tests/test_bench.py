"""bench/_common.py's profile summary: a real jax.profiler trace of a small jitted step."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import _common  # noqa: E402


def _step(x, w, v):
    def loss(w, v):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = jax.nn.relu(y)
        return jnp.sum((y.reshape(y.shape[0], -1) @ v) ** 2)

    g = jax.grad(loss, argnums=(0, 1))(w, v)
    return w - 1e-3 * g[0], v - 1e-3 * g[1]


def test_profile_breakdown_of_a_traced_step(tmp_path):
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 16))
    w = jax.random.normal(jax.random.key(1), (3, 3, 16, 32)) * 0.1
    v = jax.random.normal(jax.random.key(2), (32 * 32 * 32, 64)) * 0.01
    compiled = jax.jit(_step).lower(x, w, v).compile()
    hlo = compiled.as_text()
    instrs = _common.hlo_instructions(hlo)
    assert any(k == "convolution" for *_, k in instrs.values())
    jax.block_until_ready(compiled(x, w, v))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            jax.block_until_ready(compiled(x, w, v))
    r = _common.profile_breakdown(str(tmp_path), hlo, steps=2, top=5)
    assert r["timed_ms_per_step"] > 0
    for group in ("by_kind", "by_phase", "by_phase_kind"):
        assert sum(g["ms"] for g in r[group].values()) == pytest.approx(r["timed_ms_per_step"], rel=1e-3, abs=0.05)
        assert sum(g["share"] for g in r[group].values()) == pytest.approx(1.0, abs=1e-3)
    assert r["by_kind"]["convolution"]["ms"] > 0  # the conv and its two gradients ran
    assert set(r["by_phase"]) <= {"forward", "backward", "update/other", "unattributed"}
    assert r["by_phase"]["backward"]["ms"] > 0
    assert 0 < len(r["top_ops"]) <= 5 and all(o["op"] in instrs for o in r["top_ops"])
    assert [o["ms"] for o in r["top_ops"]] == sorted((o["ms"] for o in r["top_ops"]), reverse=True)
    # the time is per step: a trace of the same 2 steps read as 1 step doubles every figure
    r1 = _common.profile_breakdown(str(tmp_path), hlo, steps=1, top=5)
    np.testing.assert_allclose(r1["timed_ms_per_step"], 2 * r["timed_ms_per_step"], rtol=1e-3, atol=0.02)


def test_profile_breakdown_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="xplane"):
        _common.profile_breakdown(str(tmp_path), "", steps=1)


def test_conv_layers_times_forward_and_both_gradients():
    import conv_layers

    x = jnp.ones((2, 6, 6, 4)); w = jnp.ones((3, 3, 4, 5)); dy = jnp.ones((2, 6, 6, 5))
    hlo = conv_layers.train_fn().lower(x, w, dy).compile().as_text()
    # forward, input gradient and kernel gradient all survive dead-code elimination
    assert hlo.count(" convolution(") == 3, hlo
    y, dx, dw = conv_layers.train_fn()(x, w, dy)
    ref = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(y, ref, rtol=1e-6)
    assert dx.shape == x.shape and dw.shape == w.shape
    (rec,) = conv_layers.ours([(6, 4, 5)], batch=2, dtype="float32", repeats=2)
    assert rec["shape"] == [6, 4, 5] and rec["median_ms"] > 0
    assert rec["gflops_per_s"] == pytest.approx(3 * conv_layers.conv_flops(2, 6, 4, 5) / rec["median_ms"] / 1e6)
    with pytest.raises(SystemExit, match="HxCINxCOUT"):
        conv_layers.parse_shapes("14x256")


def test_minusface_demo_energy_spread():
    import minusface_demo
    assert minusface_demo.energy_spread(np.eye(192)[5] * 7.0) == pytest.approx((1.0, 1.0))
    top3, eff = minusface_demo.energy_spread(np.ones(192))
    assert top3 == pytest.approx(3 / 192) and eff == pytest.approx(192.0)
    top3, eff = minusface_demo.energy_spread([2.0, 1.0, 1.0, 0.0])  # p = (1/2, 1/4, 1/4, 0)
    assert top3 == pytest.approx(1.0) and eff == pytest.approx(1 / (0.25 + 0.0625 + 0.0625))
    for bad in (np.zeros(192), [1.0, -1.0], [np.nan, 1.0]):
        with pytest.raises(ValueError, match="energy must be finite"):
            minusface_demo.energy_spread(bad)


def test_minusface_stage2_ablation_patches(monkeypatch):
    # bench/minusface_stage2_ablation.py: identity permutations, and an oracle g that removes the K largest channels
    import minusface_stage2_ablation as abl

    from ppfr_jax import frequency
    from ppfr_jax.models import minusface, unet
    monkeypatch.setattr(frequency, "draw_permutations", frequency.draw_permutations)  # restored after the test
    monkeypatch.setattr(minusface.MinusBackbone, "residue", minusface.MinusBackbone.residue)
    with pytest.raises(ValueError, match="--ablation must be one of"):
        abl.patch("shuffle_less")
    with pytest.raises(ValueError, match="--oracle-k must be in 1..12"):
        abl.patch("oracle", 0)
    abl.patch("no_shuffle")
    p = frequency.draw_permutations(jax.random.key(0), 2, 3)
    assert p.shape == (3, 2, 192) and (np.asarray(p) == np.arange(192)).all()
    abl.patch("oracle", 3)
    gen = unet.UNet(in_channels=192, out_channels=192, widths=(4, 8))
    rec = minusface.MinusBackbone(generator=gen, recognizer=None, mode="stage1")
    x = jax.random.uniform(jax.random.key(1), (1, 112, 112, 3), minval=-1.0, maxval=1.0)
    out, _ = rec.init_with_output(jax.random.key(2), x, method=minusface.MinusBackbone.residue)
    r, d = np.asarray(out["x_residue_up"]), np.asarray(frequency.dct_transform(x))
    assert (r[..., [0, 128, 64]] == 0).all() and np.array_equal(r[..., 1], d[..., 1])
    assert np.abs(d[..., 0]).max() > 100  # the removed DC was not zero to begin with


def test_minusface_stage2_ablation_canonical_view():
    # the slots' order, sign and scale are gone: a re-ordered, sign-flipped, rescaled X_p gives the same view
    import minusface_stage2_ablation as abl

    from ppfr_jax import frequency
    rng = np.random.default_rng(0)
    base = rng.exponential(1.0, (1, 112, 112, 6)) - 1.0  # skewed maps (skewness > 0)
    base *= np.array([3.0, 2.0, 1.2, 2.5, 0.8, 0.5])  # distinct energies

    def x_p(z):  # z: (N, 112, 112, 6) YCbCr slots (offset removed) -> X_p in [0, 1], as idct_transform's end
        z = z.reshape(1, 112, 112, 2, 3)
        rgb = (np.einsum("nhwdc,ec->nhwde", z + 128.0, frequency._RGB_FROM_YCBCR) + frequency._RGB_OFFSET) / 255.0
        assert 0.0 < rgb.min() and rgb.max() < 1.0  # no clamping, so the colour map is invertible
        return jnp.asarray(rgb.reshape(1, 112, 112, 6), jnp.float32)

    view = np.asarray(abl.canonical_view(x_p(base), eps=1e-8))  # eps (in 1/255 levels) would bias the rescaled copy
    other = base[..., [4, 0, 5, 2, 1, 3]] * np.array([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]) * 0.5
    np.testing.assert_allclose(np.asarray(abl.canonical_view(x_p(other), eps=1e-8)), view, atol=2e-3)
    np.testing.assert_allclose(view.std(axis=(1, 2)), 1.0, atol=1e-3)
    assert ((view ** 3).mean(axis=(1, 2)) > 0).all()
    np.testing.assert_allclose(view[..., 0], (base[..., 0] - base[..., 0].mean()) / base[..., 0].std(), atol=2e-3)
    with pytest.raises(ValueError, match=r"X_p must be \(N, H, W, 3 \* n_duplicate\)"):
        abl.canonical_view(jnp.zeros((1, 112, 112, 4)))


def test_minusface_stage2_ablation_warm_start_variables():
    import minusface_stage2_ablation as abl
    k_rgb, k_here = np.ones((3, 3, 3, 8)), np.full((3, 3, 9, 8), 5.0)  # stem: RGB run 3 inputs, n_duplicate=3 here
    here = {"params": {"recognizer": {"stem": k_here, "w": np.zeros(4)}, "head": {"w": np.zeros((4, 10))}},
            "batch_stats": {"recognizer": {"mean": np.zeros(8)}}, "frozen": {"generator": {"k": np.ones(2)}}}
    rgb = {"params": {"backbone": {"stem": k_rgb, "w": np.arange(4.0)}, "head": {"w": np.ones((4, 10))}},
           "batch_stats": {"backbone": {"mean": np.full(8, 2.0)}}}
    out = abl.warm_start_variables(here, rgb)
    stem = np.asarray(out["params"]["recognizer"]["stem"])
    assert stem.shape == (3, 3, 9, 8) and (stem[:, :, :3] == 1).all() and (stem[:, :, 3:] == 0).all()
    assert np.array_equal(out["params"]["recognizer"]["w"], np.arange(4.0))
    assert (np.asarray(out["params"]["head"]["w"]) == 1).all() and (np.asarray(out["batch_stats"]["recognizer"]["mean"]) == 2).all()
    assert out["frozen"] is here["frozen"] and (here["params"]["recognizer"]["stem"] == 5).all()  # input untouched
    rgb["params"]["head"]["w"] = np.ones((4, 11))
    with pytest.raises(ValueError, match=r"head/\['w'\] has shape \(4, 11\) in the RGB run, \(4, 10\) here"):
        abl.warm_start_variables(here, rgb)
    rgb["params"]["backbone"] = {"other": np.ones(4)}
    with pytest.raises(ValueError, match="is not this recogniser's"):
        abl.warm_start_variables(here, rgb)


def test_ref_minusface_demo_overrides_and_stop_after(tmp_path):
    """bench/ref_minusface_demo.py's --set (as --config.FIELD= for ours) and --stop-after (first N steps of
    the whole schedule): the LRs handed to the reference are the schedule ours runs."""
    import ref_minusface_demo as rmd
    from ppfr_jax import optim
    c = rmd.demo_config("stage2", 1.0, "runs/x", overrides=["head.margin=0.0", "num_epochs=48.0",
                                                             "optim.boundaries_epochs=(38.4,)",
                                                             "optim.warmup_epochs=0.3"])
    assert c.head.margin == 0.0 and c.num_epochs == 48.0 and tuple(c.optim.boundaries_epochs) == (38.4,)
    assert c.minusface.stage1_workdir == "runs/x"
    with pytest.raises(SystemExit, match="expected FIELD.PATH=VALUE"):
        rmd.demo_config("stage2", 1.0, overrides=["head.margin"])
    sched = optim.make_schedule(c, 42)  # the demo: 42 steps per epoch, 2,016 steps
    assert float(sched(12)) == pytest.approx(0.1 * 12 / 13, rel=1e-5)  # warm-up: round(0.3 x 42) = 13 steps
    assert float(sched(1700)) == pytest.approx(0.01, rel=1e-5)  # after the boundary at 38.4 x 42 = 1,612.8
    lrs, num_classes, steps = rmd.batches_and_lrs(c, str(tmp_path / "b.npz"), stop_after=3)
    assert steps == 3 and num_classes == 115 and lrs == pytest.approx([float(sched(i)) for i in range(3)])
    b = np.load(tmp_path / "b.npz")
    assert b["images"].shape == (3, 64, 112, 112, 3) and b["labels"].shape == (3, 64)
    # a resumed run (--resume): the same batches from step 1 on, the whole run's LRs, first_step recorded
    lrs2, _, steps2 = rmd.batches_and_lrs(c, str(tmp_path / "b1.npz"), stop_after=3, start_at=1)
    b1 = np.load(tmp_path / "b1.npz")
    assert steps2 == 3 and lrs2 == lrs and int(b1["first_step"]) == 1 and int(b["first_step"]) == 0
    np.testing.assert_array_equal(b1["images"], b["images"][1:])
    np.testing.assert_array_equal(b1["labels"], b["labels"][1:])
    with pytest.raises(SystemExit, match="resume at step 3: outside the run's 3 steps"):
        rmd.batches_and_lrs(c, "", stop_after=3, start_at=3)
