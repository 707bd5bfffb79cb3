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
