"""Frequency representation shared by DuetFace and MinusFace.

``dct_transform``: (N, 112, 112, 3) RGB in [-1, 1] -> (N, 112, 112, 192), the
reference pipeline (TFace ``partialface/utils.py``): bilinear x8 upsample
(align_corners=True, 112 -> 896) -> x255 -> JPEG full-range YCbCr -> -128 ->
orthonormal 8x8 block DCT-II; channel = colour * 64 + 8 * row_freq + col_freq,
colour in (Y, Cb, Cr). ``idct_transform`` is its exact inverse, clamped to
[0, 1]. Also: the DuetFace channel split (``split_channels`` /
``merge_channels``: 162 server, 30 client channels) and MinusFace's per-sample
channel shuffle (``shuffle_decode``). All functions take and return NHWC
arrays, are jit-able and differentiable (``nchw_to_nhwc`` / ``nhwc_to_nchw``
convert at the edges); wrong shapes raise ``ValueError``. The 896x896 image
is never built (banded per-axis operators); details: README, Differences from
the reference, Frequency transform and DCT.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SIZE = 112
BLOCK = 8
RATIO = 8
NUM_FREQ = BLOCK * BLOCK  # 64 coefficients per colour
NUM_CHANNELS = 3 * NUM_FREQ  # 192

# DuetFace: the visually crucial low-frequency coefficients kept by the client.
SUB_CHS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 8, 9, 16, 24)

# JPEG full-range colour conversion, with torchjpeg's exact constants
# (to_rgb is not the exact matrix inverse of to_ycbcr; we follow the reference).
_YCBCR_FROM_RGB = np.array([[0.29900, 0.58700, 0.11400],
                            [-0.168735892, -0.331264108, 0.50000],
                            [0.50000, -0.418687589, -0.081312411]])
_YCBCR_OFFSET = np.array([0.0, 128.0, 128.0])
_RGB_FROM_YCBCR = np.array([[1.0, 0.0, 1.40200],
                            [1.0, -0.344136286, -0.714136286],
                            [1.0, 1.77200, 0.0]])
_RGB_OFFSET = np.array([-179.456, 135.458816, -226.816])


def nchw_to_nhwc(x):
    return jnp.transpose(x, (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


def dct_matrix(n: int = BLOCK) -> np.ndarray:
    """Orthonormal DCT-II matrix ``D[u, r]`` (float64): coeff = D @ block @ D.T."""
    r = np.arange(n)
    d = np.cos((2 * r[None, :] + 1) * r[:, None] * np.pi / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def bilinear_matrix(n_in: int, n_out: int, align_corners: bool = True) -> np.ndarray:
    """1-D bilinear resampling matrix (n_out, n_in) with torch's conventions (float64).

    ``align_corners=True`` maps the corner pixels onto each other;
    ``False`` uses half-pixel centres with the source index clamped at 0
    (``nn.Upsample(size=..., mode='bilinear')``).
    """
    if align_corners:
        src = np.arange(n_out) * ((n_in - 1) / (n_out - 1))
    else:
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.clip(np.floor(src).astype(np.int64), 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def _stencil(dense: np.ndarray):
    """Compress a near-diagonal (rows, cols, ...) operator into a stencil.

    Every row r of these operators only reads cols ``r + lo .. r + lo + K - 1``
    (the upsampled samples of block r come from source pixels r-1..r+1; output
    pixel p reads blocks p, p+1). Returns ``lo``, and weights ``w`` (rows, K,
    ...) with ``dense[r, r + lo + k] == w[r, k]`` (zero where out of range),
    so the operator is K shifted slices of a padded array: no gathers.
    """
    rows, cols = dense.shape[:2]
    nz = np.abs(dense.reshape(rows, cols, -1)).sum(-1) > 0
    r_idx, c_idx = np.nonzero(nz)
    lo = int((c_idx - r_idx).min())
    hi = int((c_idx - r_idx).max())
    k = hi - lo + 1
    w = np.zeros((rows, k) + dense.shape[2:])
    for r in range(rows):
        for j in range(k):
            c = r + lo + j
            if 0 <= c < cols:
                w[r, j] = dense[r, c]
    return lo, w


@functools.lru_cache(maxsize=None)
def _forward_operator(size: int = IMAGE_SIZE):
    """Per axis: (block i, freq u) <- source pixels i+lo .. i+lo+K-1. Returns lo, w (size, K, 8)."""
    up = bilinear_matrix(size, size * RATIO)  # (896, 112)
    d = dct_matrix()
    # A[i, s, u] = sum_r D[u, r] * up[8 i + r, s]
    a = np.einsum("ur,irs->isu", d, up.reshape(size, BLOCK, size))
    return _stencil(a)


@functools.lru_cache(maxsize=None)
def _inverse_operator(size: int = IMAGE_SIZE):
    """Per axis: output pixel p <- (block p+lo .. p+lo+K-1, freq v). Returns lo, w (size, K, 8)."""
    down = bilinear_matrix(size * RATIO, size)  # (112, 896)
    d = dct_matrix()
    # C[p, j, v] = sum_r down[p, 8 j + r] * D[v, r]   (block IDCT: x_r = sum_v D[v, r] y_v)
    c = np.einsum("pjr,vr->pjv", down.reshape(size, size, BLOCK), d)
    return _stencil(c)


def _shifted(x, axis: int, lo: int, k: int):
    """The K slices x[r + lo + j] (j < K) along ``axis``, zero-padded at the edges."""
    size = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (max(0, -lo), max(0, lo + k - 1))
    xp = jnp.pad(x, pad)
    off = max(0, -lo) + lo
    return [jax.lax.slice_in_dim(xp, off + j, off + j + size, axis=axis) for j in range(k)]


def _check_images(x, name="x"):
    if x.ndim != 4 or x.shape[1] != IMAGE_SIZE or x.shape[2] != IMAGE_SIZE or x.shape[3] != 3:
        raise ValueError(
            f"{name} must be an NHWC batch of {IMAGE_SIZE}x{IMAGE_SIZE} RGB images, got shape {x.shape} "
            "(use nchw_to_nhwc for NCHW input)")


def dct_transform(x: jax.Array, chunk_size: int | None = None) -> jax.Array:
    """RGB faces -> 192 block-DCT channels of the 8x upsampled image.

    Args:
      x: (N, 112, 112, 3) RGB in [-1, 1].
      chunk_size: None (default) transforms the whole batch at once. An integer
        runs it as a loop over chunks of at most that many images (the largest
        divisor of N not above it, so each chunk's result is written in place
        into the output): the working memory beyond the output shrinks by
        N / chunk, at some cost in speed (figures: bench/RESULTS.md, Frequency
        transform); for memory-bound hosts and large batches.
    Returns:
      (N, 112, 112, 192) float, channel = colour * 64 + 8 * row_freq + col_freq,
      colour in (Y, Cb, Cr).
    """
    _check_images(x)
    n = x.shape[0]
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive number of images or None, got {chunk_size!r}")
        c = max(d for d in range(1, min(int(chunk_size), n) + 1) if n % d == 0)
        if c < n:
            out = jax.lax.map(_dct_transform, x.reshape((n // c, c) + x.shape[1:]))
            return out.reshape((n,) + out.shape[2:])
    return _dct_transform(x)


def _dct_transform(x: jax.Array) -> jax.Array:
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    lo, w = _forward_operator()
    w = jnp.asarray(w, dtype)  # (112, K, 8)
    k = w.shape[1]
    # pixel values 0..255, YCbCr, centred: affine per pixel, commutes with resampling
    z = (x.astype(dtype) * 0.5 + 0.5) * 255.0
    m = jnp.asarray(_YCBCR_FROM_RGB, dtype)
    z = jnp.einsum("nhwc,dc->nhwd", z, m, precision=jax.lax.Precision.HIGHEST) + jnp.asarray(_YCBCR_OFFSET - 128.0, dtype)
    # width: t[n, h, j, c, v] = sum_b w[j, b, v] z[n, h, j + lo + b, c]
    t = sum(zb[..., None] * w[None, None, :, None, b, :] for b, zb in enumerate(_shifted(z, 2, lo, k)))
    # height: y[n, i, j, c, u, v] = sum_a w[i, a, u] t[n, i + lo + a, j, c, v]
    y = sum(ta[:, :, :, :, None, :] * w[None, :, None, None, a, :, None] for a, ta in enumerate(_shifted(t, 1, lo, k)))
    n = x.shape[0]
    return y.reshape(n, IMAGE_SIZE, IMAGE_SIZE, NUM_CHANNELS)


def idct_transform(y: jax.Array) -> jax.Array:
    """Inverse of ``dct_transform`` back to a 112x112 RGB image in [0, 1] (clamped).

    Args:
      y: (N, 112, 112, 192) DCT channels (zeros allowed for dropped channels).
    Returns:
      (N, 112, 112, 3) RGB in [0, 1]. Map with ``2 * out - 1`` to get [-1, 1].
    """
    if y.ndim != 4 or y.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, NUM_CHANNELS):
        raise ValueError(f"y must be (N, {IMAGE_SIZE}, {IMAGE_SIZE}, {NUM_CHANNELS}) DCT channels, got {y.shape}")
    dtype = y.dtype
    lo, w = _inverse_operator()
    w = jnp.asarray(w, dtype)  # (112, K, 8)
    k = w.shape[1]
    n = y.shape[0]
    y = y.reshape(n, IMAGE_SIZE, IMAGE_SIZE, 3, BLOCK, BLOCK)  # (n, i, j, c, u, v)
    # width: t[n, i, q, c, u] = sum_b sum_v w[q, b, v] y[n, i, q + lo + b, c, u, v]
    t = sum((yb * w[None, None, :, None, None, b, :]).sum(-1) for b, yb in enumerate(_shifted(y, 2, lo, k)))
    # height: z[n, p, q, c] = sum_a sum_u w[p, a, u] t[n, p + lo + a, q, c, u]
    z = sum((ta * w[None, :, None, None, a, :]).sum(-1) for a, ta in enumerate(_shifted(t, 1, lo, k)))
    m = jnp.asarray(_RGB_FROM_YCBCR, dtype)
    rgb = jnp.einsum("nhwc,dc->nhwd", z + 128.0, m, precision=jax.lax.Precision.HIGHEST) + jnp.asarray(_RGB_OFFSET, dtype)
    return jnp.clip(rgb / 255.0, 0.0, 1.0)


# --------------------------------------------------------------------------- DuetFace split


def duet_channel_indices(sub_chs: Sequence[int] = SUB_CHS) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the 192 channels: (server/main, client/sub), colour-major.

    main = the 64 - len(sub_chs) other frequencies of each colour in ascending
    order (what the reference's ``set`` difference iterates to), so
    ``main[c * n_main + k]`` is colour c's k-th kept frequency.
    """
    sub = [int(s) for s in sub_chs]
    if len(set(sub)) != len(sub) or not all(0 <= s < NUM_FREQ for s in sub):
        raise ValueError(f"sub_chs must be distinct frequencies in [0, 64), got {list(sub_chs)}")
    main = sorted(set(range(NUM_FREQ)) - set(sub))
    main_idx = np.array([c * NUM_FREQ + f for c in range(3) for f in main], np.int32)
    sub_idx = np.array([c * NUM_FREQ + f for c in range(3) for f in sub], np.int32)
    return main_idx, sub_idx


def _runs(values) -> list[tuple[int, int]]:
    """Sorted ints -> maximal [start, stop) runs of consecutive values."""
    out, start = [], 0
    for k in range(1, len(values) + 1):
        if k == len(values) or values[k] != values[k - 1] + 1:
            out.append((int(values[start]), int(values[k - 1]) + 1))
            start = k
    return out


def split_channels(x_dct: jax.Array, sub_chs: Sequence[int] = SUB_CHS) -> tuple[jax.Array, jax.Array]:
    """(N, H, W, 192) -> (server (N, H, W, 162), client (N, H, W, 30)) for the default SUB_CHS.

    The same frequencies are taken from each colour. For ascending ``sub_chs`` the
    split is a few contiguous slices of the (colour, 64) view, which XLA fuses into
    the DCT; a gather over the 192 channels (``jnp.take``) costs about three times
    the DCT itself on CPU. Other orders keep the caller's order with a gather.
    """
    main_idx, sub_idx = duet_channel_indices(sub_chs)
    if x_dct.shape[-1] != NUM_CHANNELS:
        raise ValueError(f"expected {NUM_CHANNELS} DCT channels on the last axis, got shape {x_dct.shape}")
    sub = [int(s) for s in sub_chs]
    if sub != sorted(sub):
        return jnp.take(x_dct, main_idx, axis=-1), jnp.take(x_dct, sub_idx, axis=-1)
    main = sorted(set(range(NUM_FREQ)) - set(sub))
    e = x_dct.reshape(*x_dct.shape[:-1], 3, NUM_FREQ)
    take = lambda freqs: jnp.concatenate([e[..., a:b] for a, b in _runs(freqs)], axis=-1).reshape(
        *x_dct.shape[:-1], 3 * len(freqs))
    return take(main), take(sub)


def merge_channels(server: jax.Array, client: jax.Array | None, sub_chs: Sequence[int] = SUB_CHS) -> jax.Array:
    """Inverse of ``split_channels``; ``client=None`` zero-fills the client channels."""
    main_idx, sub_idx = duet_channel_indices(sub_chs)
    sub = [int(s) for s in sub_chs]
    if sub != sorted(sub):
        out = jnp.zeros(server.shape[:-1] + (NUM_CHANNELS,), server.dtype)
        out = out.at[..., main_idx].set(server)
        if client is not None:
            out = out.at[..., sub_idx].set(client)
        return out
    # ascending sub_chs: contiguous slices of the (colour, frequency) views put side by side, as in
    # split_channels; XLA:CPU runs a scatter over the channel axis element by element (the
    # privacy view's decode of a batch of 64 took 4.0 s that way)
    lead = server.shape[:-1]
    main = sorted(set(range(NUM_FREQ)) - set(sub))
    parts = {"m": server.reshape(*lead, 3, len(main))}
    if client is not None:
        parts["s"] = client.astype(server.dtype).reshape(*lead, 3, len(sub))
    where = {f: ("m", k) for k, f in enumerate(main)}
    where.update({f: ("s", k) if client is not None else ("z", 0) for k, f in enumerate(sub)})
    pieces, f = [], 0
    while f < NUM_FREQ:
        src, k = where[f]
        g = f
        while g + 1 < NUM_FREQ and where[g + 1][0] == src and (src == "z" or where[g + 1][1] == k + g + 1 - f):
            g += 1
        if src == "z":
            pieces.append(jnp.zeros((*lead, 3, g + 1 - f), server.dtype))
        else:
            pieces.append(parts[src][..., k:k + g + 1 - f])
        f = g + 1
    return jnp.concatenate(pieces, axis=-1).reshape(*lead, NUM_CHANNELS)


# --------------------------------------------------------------------------- MinusFace shuffle


def random_permutations(key: jax.Array, batch: int, channels: int = NUM_CHANNELS) -> jax.Array:
    """One independent permutation of ``channels`` per sample: (batch, channels) int32."""
    keys = jax.random.split(key, batch)
    return jax.vmap(lambda k: jax.random.permutation(k, channels))(keys)


def permute_channels(x: jax.Array, perms: jax.Array) -> jax.Array:
    """out[n, ..., c] = x[n, ..., perms[n, c]] (the reference's gather on dim 1)."""
    return jnp.take_along_axis(x, perms[:, None, None, :], axis=-1)


def draw_permutations(key: jax.Array, batch: int, n_duplicate: int = 1, channels: int = NUM_CHANNELS) -> jax.Array:
    """Independent channel permutations: (n_duplicate, batch, channels) int32.

    One sub-key per duplicate, then one per sample (``random_permutations``).
    """
    if n_duplicate < 1:
        raise ValueError(f"n_duplicate must be >= 1, got {n_duplicate}")
    return jnp.stack([random_permutations(k, batch, channels) for k in jax.random.split(key, n_duplicate)])


def shuffle_decode(residue: jax.Array, key: jax.Array | None = None, *, perms: jax.Array | None = None,
                   n_duplicate: int = 1) -> jax.Array:
    """MinusFace stage-2 protected image: per-sample channel shuffle of the residue, then inverse DCT.

    Args:
      residue: (N, 112, 112, 192) DCT-domain residue ``x - g(x)``.
      key: ``jax.random`` key the permutations are drawn from (``draw_permutations``;
        ignored if ``perms``); a fresh key gives a fresh protection.
      perms: (n_duplicate, N, 192) or (N, 192) permutations to use instead
        (e.g. recorded ones, for parity tests, or the host's in deployment).
      n_duplicate: independent shuffles concatenated on channels.
    Returns:
      (N, 112, 112, 3 * n_duplicate) in [0, 1] (what the reference feeds its
      stage-2 recogniser: no ``*2-1``).
    Raises:
      ValueError: neither key nor perms, or perms of the wrong shape.
    """
    n = residue.shape[0]
    if perms is None:
        if key is None:
            raise ValueError("shuffle_decode needs a jax.random key (or explicit perms)")
        perms = draw_permutations(key, n, n_duplicate, residue.shape[-1])
    perms = jnp.asarray(perms)
    if perms.ndim == 2:
        perms = perms[None]
    if perms.ndim != 3 or perms.shape[1:] != (n, residue.shape[-1]):
        raise ValueError(f"perms must be (n_duplicate, {n}, {residue.shape[-1]}), got shape {perms.shape}")
    return jnp.concatenate([idct_transform(permute_channels(residue, p)) for p in perms], axis=-1)


# --------------------------------------------------------------------------- reference path


def dct_transform_naive(x: jax.Array) -> jax.Array:
    """The straightforward computation: materialise the 896x896 image, then block-DCT it.

    Same numbers as ``dct_transform``; kept for tests and ``bench/frequency.py``.
    """
    _check_images(x)
    up = jnp.asarray(bilinear_matrix(IMAGE_SIZE, IMAGE_SIZE * RATIO), x.dtype)
    img = (x * 0.5 + 0.5)
    hp = jax.lax.Precision.HIGHEST
    img = jnp.einsum("Ih,nhwc->nIwc", up, img, precision=hp)
    img = jnp.einsum("Jw,nIwc->nIJc", up, img, precision=hp)
    img = img * 255.0
    img = jnp.einsum("nhwc,dc->nhwd", img, jnp.asarray(_YCBCR_FROM_RGB, x.dtype), precision=hp)
    img = img + jnp.asarray(_YCBCR_OFFSET, x.dtype) - 128.0
    n = x.shape[0]
    blocks = img.reshape(n, IMAGE_SIZE, BLOCK, IMAGE_SIZE, BLOCK, 3)
    d = jnp.asarray(dct_matrix(), x.dtype)
    coef = jnp.einsum("ur,nirjsc,vs->nijcuv", d, blocks, d, precision=hp)
    return coef.reshape(n, IMAGE_SIZE, IMAGE_SIZE, NUM_CHANNELS)
