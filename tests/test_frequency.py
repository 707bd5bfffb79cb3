"""Frequency transform parity with the reference (golden dct.npz) and properties.

Tolerances: the golden README's ``suggested_atol`` (10x the float32-vs-float64
error the reference itself carries). dct values reach ~733, so 0.044 absolute
is ~6e-5 relative.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_summarised_close, load_golden, suggested_atol
from ppfr_jax import frequency as F


@pytest.fixture(scope="module")
def g():
    return load_golden("dct")


@pytest.fixture(scope="module")
def dct_out(g):
    return jax.jit(F.dct_transform)(F.nchw_to_nhwc(jnp.asarray(g["x"])))


def test_dct_matches_reference(g, dct_out):
    y = np.asarray(F.nhwc_to_nchw(dct_out))
    atol = suggested_atol("dct", "dct")
    np.testing.assert_allclose(y[:, :, 48:64, 48:64], g["dct__crop_rows48_64_cols48_64"], rtol=0, atol=atol)
    assert_summarised_close(g, "dct", y, atol=atol)


def test_idct_matches_reference(g, dct_out):
    inv = np.asarray(F.nhwc_to_nchw(jax.jit(F.idct_transform)(dct_out)))
    np.testing.assert_allclose(inv, g["idct_of_dct"], rtol=0, atol=suggested_atol("dct", "idct_of_dct"))


def test_duet_split_matches_reference(g, dct_out):
    main_idx, sub_idx = F.duet_channel_indices(tuple(int(c) for c in g["duet_sub_channels"]))
    np.testing.assert_array_equal(main_idx, g["duet_main_index"])
    np.testing.assert_array_equal(sub_idx, g["duet_sub_index"])
    server, client = F.split_channels(dct_out)
    assert server.shape[-1] == 162 and client.shape[-1] == 30
    assert_summarised_close(g, "duet_main", np.asarray(F.nhwc_to_nchw(server)), atol=suggested_atol("dct", "duet_main"))
    assert_summarised_close(g, "duet_sub", np.asarray(F.nhwc_to_nchw(client)), atol=suggested_atol("dct", "duet_sub"))
    # merge is the exact inverse of split
    np.testing.assert_array_equal(np.asarray(F.merge_channels(server, client)), np.asarray(dct_out))


def test_shuffle_decode_with_recorded_permutation(g, dct_out):
    shuffled = F.permute_channels(dct_out, jnp.asarray(g["shuffle_perm"]))
    out = np.asarray(F.nhwc_to_nchw(F.idct_transform(shuffled)))
    np.testing.assert_allclose(out, g["idct_of_shuffled"], rtol=0, atol=suggested_atol("dct", "idct_of_shuffled"))


def test_fused_equals_materialised_upsample():
    x = jax.random.uniform(jax.random.key(0), (2, 112, 112, 3), minval=-1, maxval=1)
    a = jax.jit(F.dct_transform)(x)
    b = jax.jit(F.dct_transform_naive)(x)
    # both float32; different summation order only
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-3)


@pytest.mark.parametrize("n,chunk", [(6, 2), (5, 4), (3, 8)])  # even chunks; 5 -> chunks of 1; chunk > N
def test_chunked_equals_whole_batch(n, chunk):
    x = jax.random.uniform(jax.random.key(1), (n, 112, 112, 3), minval=-1, maxval=1)
    a = jax.jit(F.dct_transform)(x)
    b = jax.jit(lambda x: F.dct_transform(x, chunk_size=chunk))(x)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-3)  # same ops per image
    with pytest.raises(ValueError, match="chunk_size"):
        F.dct_transform(x, chunk_size=0)


def test_shuffle_is_random_per_sample_and_key():
    r = jax.random.normal(jax.random.key(1), (3, 112, 112, 192)) * 20
    k1, k2 = jax.random.split(jax.random.key(2))
    a = F.shuffle_decode(r, k1, n_duplicate=2)
    b = F.shuffle_decode(r, k2, n_duplicate=2)
    assert a.shape == (3, 112, 112, 6)
    assert float(jnp.abs(a - b).max()) > 0.1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(F.shuffle_decode(r, k1, n_duplicate=2)))
    perms = np.asarray(F.random_permutations(k1, 3))
    assert all(sorted(p) == list(range(192)) for p in perms)
    assert len({tuple(p) for p in perms}) == 3


def test_idct_is_differentiable():
    y = jax.random.normal(jax.random.key(3), (1, 112, 112, 192))
    grad = jax.grad(lambda v: jnp.sum(F.idct_transform(v * 0.01 + F.dct_transform(jnp.zeros((1, 112, 112, 3))))))(y)
    assert grad.shape == y.shape and bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).max()) > 0


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="NHWC batch of 112x112"):
        F.dct_transform(jnp.zeros((1, 3, 112, 112)))
    with pytest.raises(ValueError, match="192"):
        F.idct_transform(jnp.zeros((1, 112, 112, 162)))
    with pytest.raises(ValueError, match="sub_chs"):
        F.duet_channel_indices((0, 0, 64))


@pytest.mark.parametrize("sub", [(0, 0, 1), (0, 64), (-1, 2)])
def test_merge_and_split_refuse_bad_sub_channels(sub):
    """Duplicate or out-of-range ``sub_chs`` get a named ValueError, not a silent wrong merge."""
    with pytest.raises(ValueError, match=r"sub_chs must be distinct frequencies in \[0, 64\)"):
        F.merge_channels(jnp.zeros((1, 2, 2, 3 * (64 - len(sub)))), jnp.zeros((1, 2, 2, 3 * len(sub))), sub)
    with pytest.raises(ValueError, match="sub_chs must be distinct"):
        F.split_channels(jnp.zeros((1, 2, 2, 192)), sub)
