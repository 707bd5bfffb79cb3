"""Facial region-of-interest masks for DuetFace, computed on the accelerator.

``landmark_mask(landmarks (B, K, 2) normalised, K >= 3) -> (B, 112, 112)``
float32 in {0, 1}: pixel (r, c) is 1 iff the point (x = c, y = r) lies in
the convex hull of ``landmarks * 112`` (boundary included), the definition of TFace
``duetface/train.py: TrainTask.calculate_landmarks`` (scipy, per sample, on
the host). Here it is batched and jit-able, evaluated exactly in int32
fixed point (landmarks clamped to ``LANDMARK_RANGE`` = [-1, 2)); degenerate
input (no hull of positive area) gives an empty mask. ``ValueError`` for a
wrong shape. ``template_mask()`` is the constant mask for aligned faces.

Landmark sources for DuetFace (``config.duetface.roi_source``): landmarks
carried by the dataset, a PFLD detector in the graph, or ``template_mask()``.
Exact arithmetic and the algorithm: README, Differences from the reference,
DuetFace ROI masks.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SIZE = 112
FRAC_BITS = 20  # fixed point: 1 unit = 2^-20 px
LANDMARK_RANGE = (-1.0, 2.0)  # normalised coordinates are clamped here (int32 headroom)
_LIMB = 15
_MASK = (1 << _LIMB) - 1


# ----------------------------------------------------------------------------- exact integer arithmetic


def to_fixed(landmarks: jax.Array) -> jax.Array:
    """Normalised float coordinates -> int32 ``round(112 * l * 2^20)`` (exact for |l| >= 0.5).

    112 * 2^20 = 7 * 2^24 and ``l * 2^24`` is exact in float32 (a power of two),
    so only the final rounding to an integer can lose bits.
    """
    if IMAGE_SIZE != 7 * 16:
        raise AssertionError("to_fixed assumes 112 = 7 * 2^4")
    lo, hi = LANDMARK_RANGE
    l = jnp.clip(jnp.asarray(landmarks, jnp.float32), lo, np.nextafter(np.float32(hi), np.float32(0)))
    return 7 * jnp.round(l * np.float32(2.0 ** 24)).astype(jnp.int32)


def _split(x):
    """x = hi * 2^15 + lo with lo in [0, 2^15) (arithmetic shift = floor)."""
    return jnp.right_shift(x, _LIMB), jnp.bitwise_and(x, _MASK)


def _mul_sub(a, b, c, d):
    """Exact ``a*b - c*d`` for int32 |a|,|b|,|c|,|d| < 2^29, as (t2, r1, r0).

    The value is ``t2 * 2^30 + r1 * 2^15 + r0`` with r1, r0 in [0, 2^15), so
    its sign is sign(t2), or >= 0 when t2 == 0. Every intermediate stays
    below 2^31: limbs |hi| < 2^13.5, lo < 2^15, partial products < 2^28.5
    (hi*lo; four of them summed) and < 2^30 (lo*lo). Our operands are
    coordinate differences, < 336 px * 2^20 < 2^28.4.
    """
    ah, al = _split(a)
    bh, bl = _split(b)
    ch, cl = _split(c)
    dh, dl = _split(d)
    t2 = ah * bh - ch * dh
    t1 = ah * bl + al * bh - ch * dl - cl * dh
    t0 = al * bl - cl * dl
    c0, r0 = _split(t0)
    t1 = t1 + c0
    c1, r1 = _split(t1)
    return t2 + c1, r1, r0


def _orient_sign(a, b, c):
    """Exact sign of the cross product (b - a) x (c - a): +1 left, 0 collinear, -1 right.

    a, b, c: int32 fixed-point points (..., 2) as (x, y). With x = column and
    y = row (pointing down) "left" is clockwise on screen; only consistency
    matters here.
    """
    t2, r1, r0 = _mul_sub(b[..., 0] - a[..., 0], c[..., 1] - a[..., 1],
                          b[..., 1] - a[..., 1], c[..., 0] - a[..., 0])
    return jnp.where(t2 != 0, jnp.sign(t2), ((r1 | r0) != 0).astype(jnp.int32))


def _ceil_shift(t2, r1, r0, bits: int = FRAC_BITS):
    """ceil(value / 2^bits) of a ``_mul_sub`` triple, for 15 < bits <= 30 (fits int32 here)."""
    s = bits - _LIMB
    floor = t2 * (1 << (30 - bits)) + jnp.right_shift(r1, s)
    rem = (jnp.bitwise_and(r1, (1 << s) - 1) | r0) != 0
    return floor + rem.astype(jnp.int32)


# ----------------------------------------------------------------------------- hull


def hull_edges(points: jax.Array):
    """Directed convex-hull edges of one point set, in fixed size.

    Args:
      points: (n, 2) int32 fixed-point (x, y), from ``to_fixed``.

    Returns:
      ``(start, end, valid)``: (n, 2), (n, 2) int32 and (n,) bool. Edge k runs
      from point k to its successor; valid edges have every point on their left
      or on them. ``valid`` is all False when the hull has no area.
    """
    n = points.shape[0]
    size = 1 << max(1, int(np.ceil(np.log2(n))))
    # candidates for each i: every point not coincident with i, padded to a power of two
    ok = ~jnp.all(points[:, None, :] == points[None, :, :], axis=-1)
    cand = jnp.broadcast_to(points[None], (n, n, 2))
    ok = jnp.pad(ok, ((0, 0), (0, size - n)))
    cand = jnp.pad(cand, ((0, 0), (0, size - n), (0, 0)))
    origin = points[:, None, :]
    while cand.shape[1] > 1:
        a, b = cand[:, 0::2], cand[:, 1::2]
        oa, ob = ok[:, 0::2], ok[:, 1::2]
        # b beats a when it lies strictly right of the ray i -> a: the winner has no point on its right
        take_b = ob & (~oa | (_orient_sign(origin, a, b) < 0))
        cand = jnp.where(take_b[..., None], b, a)
        ok = oa | ob
    start, end = points, cand[:, 0]
    has_succ = ok[:, 0]
    side = _orient_sign(start[:, None, :], end[:, None, :], points[None, :, :])  # (edge, point)
    valid = has_succ & jnp.all(side >= 0, axis=1)
    area = jnp.any(valid[:, None] & (side > 0))  # some point strictly inside some edge
    return start, end, valid & area


def _edge_tables(start, end, size: int):
    """Split the pixel orientation test of each edge into row and column tables.

    For edge a -> b (e = b - a) and pixel point p = (c, r) * 2^F:
      orient = e.x (p.y - a.y) - e.y (p.x - a.x) = 2^F * G - K,
      G = e.x (r - ay_i) - e.y (c - ax_i),  K = e.x ay_f - e.y ax_f,
    with a = a_i * 2^F + a_f. orient >= 0  <=>  G >= ceil(K / 2^F). Writing
    e = e_h 2^15 + e_l, G - ceil(K/2^F) = 2^15 (R_h[r] - C_h[c]) + (R_l[r] - C_l[c])
    where R_* depend on the row only and C_* on the column only.

    Returns (R_h, R_l) (E, size) and (C_h, C_l) (E, size) int32.
    """
    ex, ey = end[:, 0] - start[:, 0], end[:, 1] - start[:, 1]
    ax_i, ax_f = jnp.right_shift(start[:, 0], FRAC_BITS), jnp.bitwise_and(start[:, 0], (1 << FRAC_BITS) - 1)
    ay_i, ay_f = jnp.right_shift(start[:, 1], FRAC_BITS), jnp.bitwise_and(start[:, 1], (1 << FRAC_BITS) - 1)
    kc = _ceil_shift(*_mul_sub(ex, ay_f, ey, ax_f))  # |K| < 2^49 -> |kc| < 2^29
    kh, kl = _split(kc)
    exh, exl = _split(ex)
    eyh, eyl = _split(ey)
    grid = jnp.arange(size, dtype=jnp.int32)
    dr = grid[None, :] - ay_i[:, None]  # |dr| < 2^9
    dc = grid[None, :] - ax_i[:, None]
    rows = (exh[:, None] * dr - kh[:, None], exl[:, None] * dr - kl[:, None])
    cols = (eyh[:, None] * dc, eyl[:, None] * dc)
    return rows, cols


def _rasterise(start, end, valid, size: int):
    (rh, rl), (ch, cl) = _edge_tables(start, end, size)

    def body(k, inside):
        hi = rh[k][:, None] - ch[k][None, :]
        lo = rl[k][:, None] - cl[k][None, :]
        left = hi + jnp.right_shift(lo, _LIMB) >= 0  # sign of 2^15 hi + lo (lo's carry folded in)
        return inside & (left | ~valid[k])

    inside = jax.lax.fori_loop(0, start.shape[0], body, jnp.ones((size, size), bool))
    return inside & jnp.any(valid)


def _mask_one(landmarks, size: int):
    start, end, valid = hull_edges(to_fixed(landmarks))
    return _rasterise(start, end, valid, size)


@functools.partial(jax.jit, static_argnames=("size",))
def landmark_mask(landmarks: jax.Array, size: int = IMAGE_SIZE) -> jax.Array:
    """Convex-hull ROI of each face's landmarks.

    Args:
      landmarks: (B, K, 2) normalised (x = column, y = row) coordinates,
        nominally in [0, 1] (clamped to [-1, 2)); K >= 3 (98 for WFLW).
      size: raster size; coordinates are scaled by 112 (the reference's
        convention) whatever ``size`` is, so keep 112.

    Returns:
      (B, size, size) float32 in {0, 1}: pixel (r, c) is 1 iff the point
      (x=c, y=r) lies in the hull of ``landmarks * 112`` (boundary included).
    """
    landmarks = jnp.asarray(landmarks)
    if landmarks.ndim != 3 or landmarks.shape[-1] != 2 or landmarks.shape[1] < 3:
        raise ValueError(f"landmarks must be (B, K, 2) with K >= 3 points, got shape {landmarks.shape}")
    return jax.vmap(functools.partial(_mask_one, size=size))(landmarks).astype(jnp.float32)


# ----------------------------------------------------------------------------- template ROI

# Mean of the 98 WFLW landmarks (normalised, x = column, y = row) over the
# 2729 ArcFace-aligned training faces of the embedded demo set
# (ppfr_jax/demo_data, LFW), rounded to 1e-4. Aligned faces share one frame,
# so their ROI is nearly constant: a template stands in for a detector.
TEMPLATE_LANDMARKS = np.array([
    [0.1513, 0.4682], [0.1545, 0.5131], [0.1581, 0.5581], [0.1622, 0.6033], [0.168, 0.6478], [0.1764, 0.6922],
    [0.1877, 0.7361], [0.2022, 0.7787], [0.2203, 0.8196], [0.2431, 0.8567], [0.2709, 0.892], [0.3016, 0.9232],
    [0.3367, 0.9502], [0.3744, 0.9716], [0.4154, 0.9872], [0.459, 0.9972], [0.504, 1.0008], [0.5496, 0.998],
    [0.5936, 0.9885], [0.6358, 0.9745], [0.6743, 0.9539], [0.7098, 0.9267], [0.7408, 0.8944], [0.7677, 0.859],
    [0.7913, 0.8196], [0.8094, 0.778], [0.8242, 0.7355], [0.8354, 0.6914], [0.8437, 0.6463], [0.8483, 0.6014],
    [0.8516, 0.5555], [0.8547, 0.5101], [0.8568, 0.4647], [0.2308, 0.4141], [0.2788, 0.3668], [0.3294, 0.3593],
    [0.3834, 0.3633], [0.435, 0.3733], [0.4354, 0.408], [0.3832, 0.3993], [0.3301, 0.3954], [0.2789, 0.4012],
    [0.5717, 0.3717], [0.6226, 0.3598], [0.6748, 0.3549], [0.7264, 0.3638], [0.7735, 0.4123], [0.7264, 0.3982],
    [0.6744, 0.3918], [0.6218, 0.3959], [0.5718, 0.4054], [0.5059, 0.4677], [0.5049, 0.5317], [0.5036, 0.5964],
    [0.5033, 0.6596], [0.4251, 0.6896], [0.4638, 0.6977], [0.5044, 0.7027], [0.5451, 0.6986], [0.5856, 0.6925],
    [0.2801, 0.4766], [0.3092, 0.4606], [0.3424, 0.4529], [0.3799, 0.4563], [0.4117, 0.4758], [0.3788, 0.4869],
    [0.3423, 0.4909], [0.3106, 0.4869], [0.5946, 0.4748], [0.6261, 0.4553], [0.6638, 0.4524], [0.6972, 0.4602],
    [0.7275, 0.4768], [0.6969, 0.4868], [0.6643, 0.4909], [0.6284, 0.4866], [0.3661, 0.8128], [0.4174, 0.7876],
    [0.4759, 0.7807], [0.5057, 0.7818], [0.535, 0.7802], [0.5955, 0.7888], [0.6484, 0.8158], [0.6073, 0.8468],
    [0.5597, 0.8674], [0.506, 0.8749], [0.4536, 0.8674], [0.407, 0.8457], [0.3788, 0.8149], [0.4403, 0.8069],
    [0.5055, 0.809], [0.5711, 0.808], [0.6355, 0.8171], [0.5739, 0.8291], [0.5078, 0.836], [0.4419, 0.8287],
    [0.3442, 0.4719], [0.6616, 0.472]], np.float32)


@functools.lru_cache(maxsize=None)
def template_mask(size: int = IMAGE_SIZE) -> np.ndarray:
    """Constant ROI for ArcFace-aligned faces: (size, size) float32 in {0, 1}.

    The hull of ``TEMPLATE_LANDMARKS`` and their mirror image, so the mask
    is left-right symmetric and a horizontal flip of the face keeps it.
    """
    # a flip maps pixel column c to 111 - c, i.e. point x to (111 / 112) - x
    mirror = TEMPLATE_LANDMARKS * [-1, 1] + [(IMAGE_SIZE - 1) / IMAGE_SIZE, 0]
    pts = np.concatenate([TEMPLATE_LANDMARKS, mirror]).astype(np.float32)
    with jax.ensure_compile_time_eval():  # a constant, even when first asked for inside a trace
        return np.asarray(landmark_mask(pts[None], size=size)[0])
