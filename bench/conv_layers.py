"""Per-layer convolution rates on this machine: ours (XLA) and, optionally, torch (oneDNN).

    python3 bench/conv_layers.py                                          # ours only
    python3 bench/conv_layers.py --torch-python /work/refvenv/bin/python  # + torch, same shapes
    python3 bench/conv_layers.py --dtype bfloat16 --torch-python ...      # bf16 (torch: autocast)

For each 3x3 / stride 1 / pad 1 layer shape of the IR backbones (batch 8 by default), it times
the training work of one convolution: the forward output, the input gradient and the kernel
gradient, in one jitted function that returns all three. (Returning only the gradients lets XLA
drop the forward convolution as dead code; a per-layer table measured that way came out ~30% too
flattering.) torch does the same with ``y = conv(x); y.backward(dy)`` on ``x.requires_grad_()``.
Both use every core this process may run on (torch: ``set_num_threads``).

A square GEMM (``--gemm``, default 2048) is timed too, as the practical peak of each library's
kernels here. One JSON line per (framework, shape) and per GEMM: milliseconds (median) and
GFLOP/s with forward + input grad + kernel grad = 3 x the forward's FLOPs.
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import emit, time_fn  # noqa: E402

# (spatial, in channels, out channels): the stride-1 3x3 convolutions of IR-18/IR-50 at 112x112
# input (the first block of each stage runs at the previous stage's resolution)
SHAPES = ((112, 64, 64), (56, 64, 64), (56, 64, 128), (28, 128, 128), (28, 128, 256),
          (14, 256, 256), (14, 256, 512), (7, 512, 512))


def conv_flops(batch, h, ci, co):
    """Forward FLOPs of a 3x3 stride-1 'same' convolution (2 per multiply-add)."""
    return 2 * batch * h * h * ci * co * 9


def with_rate(rec, batch):
    """``rec`` plus ``gflops_per_s``: of forward + input grad + kernel grad (3x the forward's
    FLOPs) for a conv row (``shape``), of one 2n^3 product for a GEMM row (``gemm``)."""
    if "shape" in rec:
        flops = 3 * conv_flops(batch, *rec["shape"])
    else:
        flops = 2 * rec["gemm"] ** 3
    return dict(rec, gflops_per_s=flops / (rec["median_ms"] / 1e3) / 1e9)


def train_fn():
    """x, w, dy -> (y, dx, dw) of one NHWC/HWIO 3x3 stride-1 pad-1 convolution, all three live."""
    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def f(x, w, dy):
        y, vjp = jax.vjp(conv, x, w)
        dx, dw = vjp(dy.astype(y.dtype))
        return y, dx, dw
    return jax.jit(f)


def ours(shapes, batch, dtype, repeats):
    dt = jnp.dtype(dtype)
    fn = train_fn()
    rng = np.random.default_rng(0)
    out = []
    for h, ci, co in shapes:
        x = jnp.asarray(rng.standard_normal((batch, h, h, ci)), dt)
        w = jnp.asarray(rng.standard_normal((3, 3, ci, co)) * 0.05, dt)
        dy = jnp.asarray(rng.standard_normal((batch, h, h, co)), dt)
        med, mn = time_fn(fn, x, w, dy, warmup=2, repeats=repeats)
        out.append(with_rate({"framework": "jax", "shape": [h, ci, co], "median_ms": med * 1e3,
                              "min_ms": mn * 1e3}, batch))
    return out


def ours_gemm(n, dtype, repeats):
    dt = jnp.dtype(dtype)
    a = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), dt)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    med, _ = time_fn(f, a, a, warmup=1, repeats=repeats)
    return with_rate({"framework": "jax", "gemm": n, "median_ms": med * 1e3}, 0)


TORCH_SCRIPT = r"""
import json, os, sys, time
import torch
shapes, batch, dtype, repeats, gemm = json.loads(sys.argv[1])
torch.set_num_threads(len(os.sched_getaffinity(0)))
bf16 = dtype == "bfloat16"
def timed(f):
    f(); f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2], ts[0]
for h, ci, co in shapes:
    conv = torch.nn.Conv2d(ci, co, 3, 1, 1, bias=False)
    x = torch.randn(batch, ci, h, h).requires_grad_()
    dy = torch.randn(batch, co, h, h)
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = conv(x)
        y.backward(dy.to(y.dtype))
    med, mn = timed(step)
    print(json.dumps({"framework": "torch", "shape": [h, ci, co], "median_ms": med * 1e3, "min_ms": mn * 1e3,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
if gemm:
    a = torch.randn(gemm, gemm, dtype=torch.bfloat16 if bf16 else torch.float32)
    med, _ = timed(lambda: a @ a)
    print(json.dumps({"framework": "torch", "gemm": gemm, "median_ms": med * 1e3}), flush=True)
"""


def torch_runs(python, shapes, batch, dtype, repeats, gemm):
    arg = json.dumps([list(map(list, shapes)), batch, dtype, repeats, gemm])
    try:
        out = subprocess.run([python, "-c", TORCH_SCRIPT, arg], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise SystemExit(f"--torch-python {python!r}: no such interpreter")
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"torch run failed ({python}): {e.stderr.strip()[-2000:]}")
    return [with_rate(json.loads(line), batch) for line in out.stdout.splitlines() if line.startswith("{")]


def parse_shapes(text):
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes {text!r}: expected comma-separated HxCINxCOUT, e.g. 14x256x256")
    return shapes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                   help="comma-separated HxCINxCOUT (3x3, stride 1, pad 1)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--gemm", type=int, default=2048, help="square GEMM size for the peak line (0: none)")
    p.add_argument("--torch-python", default="", help="a Python with torch: run the same shapes there")
    a = p.parse_args()
    shapes = parse_shapes(a.shapes)
    rows = ours(shapes, a.batch, a.dtype, a.repeats)
    if a.gemm:
        rows.append(ours_gemm(a.gemm, a.dtype, a.repeats))
    if a.torch_python:
        rows += torch_runs(a.torch_python, shapes, a.batch, a.dtype, a.repeats, a.gemm)
    common = {"bench": "conv_layers", "batch": a.batch, "dtype": a.dtype,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "cpu_threads": len(os.sched_getaffinity(0))}
    for r in rows:
        emit(dict(common, **r))
    if a.torch_python:  # one summary line: ours / torch per shape
        by = {(r["framework"], tuple(r.get("shape", ())) or ("gemm",)): r for r in rows}
        ratio = {"x".join(map(str, s)): round(by[("torch", s)]["median_ms"] / by[("jax", s)]["median_ms"], 3)
                 for s in map(tuple, shapes)}
        emit(dict(common, summary="torch_ms / ours_ms per shape (>1: ours faster)", ratio=ratio))


if __name__ == "__main__":
    main()
