"""dct_transform (fused banded operator) vs the straightforward upsample-then-block-DCT.

    python bench/frequency.py [--batch 64] [--repeats 5] [--chunk 16]

One JSON line per implementation (``fused``: ``dct_transform(x)``;
``fused_chunked``: ``dct_transform(x, chunk_size=--chunk)``; the naive one)
plus a summary line with the ratios of each fused variant to the naive one.
"Peak" is XLA's buffer accounting of the compiled function (arguments +
outputs + temporaries); both return the same (N,112,112,192) output, so the
temporaries ("working memory") are where the two differ.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from _common import compiled_memory, emit, time_fn  # noqa: E402
from ppfr_jax import frequency as F  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=16)
    a = p.parse_args()
    x = jax.random.uniform(jax.random.key(0), (a.batch, 112, 112, 3), minval=-1, maxval=1)
    res = {}
    chunked = lambda x: F.dct_transform(x, chunk_size=a.chunk)  # noqa: E731
    for name, fn in (("fused", F.dct_transform), ("fused_chunked", chunked),
                     ("materialised_896", F.dct_transform_naive)):
        jf = jax.jit(fn)
        med, mn = time_fn(jf, x, repeats=a.repeats)
        mem = compiled_memory(fn, x)
        res[name] = dict(median_s=med, min_s=mn, images_per_s=a.batch / med, **mem)
        emit({"bench": "dct_transform", "impl": name, "batch": a.batch, **res[name]})
    n = res["materialised_896"]
    for name in ("fused", "fused_chunked"):
        f = res[name]
        emit({"bench": "dct_transform_summary", "impl": name, "batch": a.batch, "chunk": a.chunk,
              "speedup": n["median_s"] / f["median_s"],
              "peak_ratio": n.get("peak_bytes", 0) / max(f.get("peak_bytes", 1), 1),
              "temp_ratio": n.get("temp_size_in_bytes", 0) / max(f.get("temp_size_in_bytes", 1), 1)})


if __name__ == "__main__":
    main()
