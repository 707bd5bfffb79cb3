"""Training-step throughput of every method, one JSON line per case.

    python bench/train_step.py                      # CPU defaults: batch 8, IR-18 cases
    python bench/train_step.py --batch 64 --bf16    # GPU: batch 64 per device, bf16 compute
    python bench/train_step.py --cases arcface_ir50_rgb --steps 20

Each case builds the real config (``configs/<family>.py:<variant>``) with
synthetic data (random uint8 faces, random labels out of 1000 classes, the
same batch every step, as the reference benchmark does), compiles the sharded
train step once, runs warm-up steps, then times ``--steps`` steps. Reported:
images/s (batch / median step time), median/min step time, XLA's compiled
memory (bytes), FLOPs per step from XLA's cost analysis and, on a GPU with a
known peak, model FLOPs utilisation.
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "configs"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from _common import emit  # noqa: E402

# case -> (config module, variant argument, extra overrides)
CASES = {
    "arcface_ir18_rgb": ("arcface", "ir18", {}),
    "arcface_ir50_rgb": ("arcface", "ir50", {}),
    "duetface_int": ("duetface", "server,ir18,bench", {}),
    "minusface_stage1": ("minusface", "stage1,ir18,bench", {}),
    "minusface_stage2": ("minusface", "stage2,ir18,bench", {}),
}
DEFAULT_CASES = "arcface_ir18_rgb,duetface_int,minusface_stage1,minusface_stage2"

# dense bf16 peak FLOP/s by device kind (for MFU); None where unknown
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5": 459e12}


def peak_flops(kind: str):
    for k, v in PEAK_FLOPS.items():
        if k.lower() in kind.lower():
            return v
    return None


def run_case(name, batch, steps, warmup, bf16, num_classes):
    import importlib

    from ppfr_jax import train
    mod_name, variant, over = CASES[name]
    cfg = importlib.import_module(mod_name).get_config(variant)
    cfg.data.source = "synthetic"
    cfg.data.num_classes = num_classes
    cfg.batch_size = batch * jax.device_count()
    cfg.half_precision = bool(bf16)
    cfg.eval.pairs = ""
    for k, v in over.items():
        cfg[k] = v
    mesh = train.create_mesh(cfg)
    setup = train.build(cfg, num_classes, 10 * cfg.batch_size, mesh)
    state = train.init_state(setup, jax.random.key(0))
    step = train.compile_train_step(setup)
    local = next(train.synthetic_batches(cfg, setup.global_batch, 0, num_classes))
    if hasattr(setup.task, "bench_batch"):
        local = setup.task.bench_batch(local)
    batch_arr = train.make_global_batch(local, mesh)
    rng = jax.random.key(1)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_arr, rng).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    mem = compiled.memory_analysis()
    losses, times = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, m = step(state, batch_arr, rng)
        loss = float(m["loss"])  # blocks, like the reference's loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(loss)
    times.sort()
    med = times[len(times) // 2]
    rec = {"bench": name, "batch_size": batch, "global_batch": setup.global_batch, "num_classes": num_classes,
           "bf16": bool(bf16), "warmup": warmup, "steps": steps, "median_s": med, "min_s": times[0],
           "images_per_s": setup.global_batch / med, "compile_s": compile_s,
           "loss_first": losses[0], "loss_last": losses[-1], "all_losses_finite": bool(np.all(np.isfinite(losses))),
           "flops_per_step": flops, "devices": jax.device_count()}
    if mem is not None:
        rec["temp_bytes"] = int(mem.temp_size_in_bytes)
        rec["argument_bytes"] = int(mem.argument_size_in_bytes)
    if jax.default_backend() == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        rec["peak_mem_bytes"] = int(stats.get("peak_bytes_in_use", 0))
        pk = peak_flops(jax.devices()[0].device_kind)
        if pk and flops:
            rec["mfu"] = flops / med / (pk * jax.device_count())
    return rec


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default=DEFAULT_CASES)
    p.add_argument("--batch", type=int, default=None, help="per device (default 8 on CPU, 64 otherwise)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--num-classes", type=int, default=1000)
    a = p.parse_args()
    batch = a.batch or (8 if jax.default_backend() == "cpu" else 64)
    for name in a.cases.split(","):
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}; known: {sorted(CASES)}")
        try:
            rec = run_case(name, batch, a.steps, a.warmup, a.bf16, a.num_classes)
        except (ImportError, ModuleNotFoundError, ValueError) as e:
            rec = {"bench": name, "skipped": f"{type(e).__name__}: {e}"}
        emit(rec)


if __name__ == "__main__":
    main()
