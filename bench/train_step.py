"""Training-step throughput of every method, one JSON line per case.

    python bench/train_step.py                      # CPU defaults: batch 8, IR-18 cases
    python bench/train_step.py --batch 64 --bf16    # GPU: batch 64 per device, bf16 compute
    python bench/train_step.py --cases arcface_ir50_rgb --steps 20

Cases (the same models as ``../shared/reference/ref_bench.py``'s cases of the same name):

* ``arcface_ir18_rgb`` / ``arcface_ir50_rgb``: ``configs/arcface.py:ir18`` / ``:ir50``.
* ``duetface_int``: ``configs/duetface.py:server,ir18`` (DuetFace stage 2): IR-18 server with
  interactive blocks on the 162 server channels, frozen MobileFaceNet client on the 30
  client channels, frozen PFLD computing the landmark ROI inside the step.
* ``minusface_stage1``: ``configs/minusface.py:stage1,ir18``: full U-Net (64..1024) + IR-18 on
  the 192-channel residue, loss 5 L1 + ArcFace.
* ``minusface_stage2``: ``configs/minusface.py:stage2,ir18``: frozen full U-Net, per-sample
  channel shuffle, IR-18 on the decoded 3-channel X_p.

The frozen parts (DuetFace's client and PFLD, MinusFace's stage-1 generator) are random
weights written to a temporary directory in the formats the configs read (an engine
checkpoint for the client / generator, an Orbax PFLD directory), so the real loading path
runs; as in the reference benchmark, PFLD's last layer is rescaled so that its landmarks
fall inside the image.

Each case builds the real config with synthetic data (random uint8 faces, random labels
out of ``--num-classes``, the same batch every step, as the reference benchmark does),
compiles the sharded train step once, runs ``--warmup`` steps, then times ``--steps``
steps, each ending with ``float(loss)`` (like the reference's ``loss.item()``). Reported:
images/s (global batch / median step time), median/min step time and every timed step,
XLA's compiled memory per device (``peak_bytes`` = arguments + outputs - aliased +
temporaries), on a GPU the allocator's ``peak_bytes_in_use`` (process-wide: run one case
per process for a per-case figure, as ``bench/compare.py`` does), FLOPs per step from
XLA's cost analysis and, where the device's peak is known, the model FLOPs utilisation
(FLOPs per device / median step time / peak per device).
"""
import argparse
import importlib
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "configs"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from _common import emit, memory_stats, profile_breakdown  # noqa: E402

# case -> (config module, variant argument, frozen weights it needs)
CASES = {
    "arcface_ir18_rgb": ("arcface", "ir18", ()),
    "arcface_ir50_rgb": ("arcface", "ir50", ()),
    "duetface_int": ("duetface", "server,ir18", ("client", "pfld")),
    "minusface_stage1": ("minusface", "stage1,ir18", ()),
    "minusface_stage2": ("minusface", "stage2,ir18", ("generator",)),
    # the demo pipelines' stages (tiny models; ``--batch 64`` is what the demo configs use)
    "arcface_demo": ("arcface", "demo", ()),
    "duetface_client_demo": ("duetface", "client,demo", ()),
    "duetface_server_demo": ("duetface", "server,demo,roi=template", ("client",)),
    "minusface_stage1_demo": ("minusface", "stage1,demo", ()),  # ``--batch 32`` is stage 1's demo batch
    "minusface_stage2_demo": ("minusface", "stage2,demo", ("generator",)),
}
DEFAULT_CASES = "arcface_ir18_rgb,duetface_int,minusface_stage1,minusface_stage2"
ALL_CASES = ",".join(CASES)

# Dense peak FLOP/s per device by device kind, for MFU: (bf16, float32). float32 is the TF32
# tensor-core peak on NVIDIA (XLA's default precision lets float32 convolutions and matmuls
# use TF32 there); None where unknown. First match wins (PCIe before the generic name).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494.5e12),  # SXM / HBM3
    ("H200", 989e12, 494.5e12),
    ("A100", 312e12, 156e12),
    ("TPU v4", 275e12, None),
    ("TPU v5 lite", 197e12, None),
    ("TPU v5", 459e12, None),
)


def peak_flops(kind: str, bf16: bool):
    for name, p16, p32 in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return p16 if bf16 else p32
    return None


def _rbg_key(seed: int):
    # one RngBitGenerator op per draw: XLA:CPU compiles these inits in seconds (threefry: minutes)
    return jax.random.key(seed, impl="rbg")


def _save(path: str, tree) -> None:
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ck:
        ck.save(os.path.abspath(path), jax.tree.map(np.asarray, tree))


def _save_engine_checkpoint(workdir: str, params: dict, model_state: dict) -> None:
    """The layout ``checkpoints.restore_variables`` reads: ``<workdir>/checkpoints/<step>/state``."""
    _save(os.path.join(workdir, "checkpoints", "0", "state"), {"params": params, "model_state": model_state})


def write_frozen_weights(cfg, needs, root: str) -> str:
    """Random frozen weights under ``root`` for the parts in ``needs``; -> the variant overrides to read them."""
    over = []
    if "client" in needs:
        from ppfr_jax.models import duetface
        d = cfg.duetface
        client = duetface.build_client(d.client_backbone, 3 * len(d.sub_channels), d.client_embedding_size)
        x = jnp.zeros((1, 112, 112, 3 * len(d.sub_channels)), jnp.float32)
        v = jax.jit(lambda r: client.init(r, x, train=False))(_rbg_key(1))
        wd = os.path.join(root, "client")
        _save_engine_checkpoint(wd, {"backbone": v["params"]}, {"batch_stats": {"backbone": v["batch_stats"]}})
        over.append(f"client_workdir={wd}")
    if "pfld" in needs:
        from ppfr_jax.models import pfld
        model = pfld.PFLDInference()
        v = jax.jit(lambda r: model.init(r, jnp.zeros((1, 112, 112, 3), jnp.float32)))(_rbg_key(2))
        v = jax.tree.map(np.array, v)
        fc = v["params"]["fc"]
        # as ref_bench.py: landmarks (normalised) inside the image, so the ROI is not empty
        fc["kernel"] = fc["kernel"] * 0.1
        fc["bias"] = np.random.default_rng(0).uniform(0.25, 0.75, fc["bias"].shape).astype(np.float32)
        path = os.path.join(root, "pfld")
        _save(path, v)
        over.append(f"pfld={path}")
    if "generator" in needs:
        from ppfr_jax import frequency
        from ppfr_jax.models import unet
        gen = unet.UNet(in_channels=frequency.NUM_CHANNELS, out_channels=frequency.NUM_CHANNELS,
                        widths=tuple(int(w) for w in cfg.minusface.generator_widths))
        x = jnp.zeros((1, 112, 112, frequency.NUM_CHANNELS), jnp.float32)
        v = jax.jit(lambda r: gen.init(r, x))(_rbg_key(3))
        wd = os.path.join(root, "stage1")
        _save_engine_checkpoint(wd, {"generator": v["params"]}, {})
        over.append(f"stage1_workdir={wd}")
    return ",".join(over)


def load_config(name: str, root: str):
    mod_name, variant, needs = CASES[name]
    mod = importlib.import_module(mod_name)
    cfg = mod.get_config(variant)
    if needs:
        cfg = mod.get_config(variant + "," + write_frozen_weights(cfg, needs, root))
    return cfg


def run_case(name, batch, steps, warmup, bf16, num_classes, profile_dir="", profile_steps=3):
    from ppfr_jax import data, sharding, train

    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as root:
        cfg = load_config(name, root)
        cfg.data.source = "synthetic"
        cfg.data.num_classes = num_classes
        cfg.batch_size = batch * jax.device_count()
        cfg.half_precision = bool(bf16)
        cfg.eval.pairs = ""
        mesh = sharding.create_mesh(cfg)
        setup = train.build(cfg, num_classes, 10 * cfg.batch_size, mesh)  # loads the frozen weights
    state = train.init_state(setup, jax.random.key(0))
    step = train.compile_train_step(setup)
    local = next(data.synthetic_batches(cfg, setup.global_batch, 0, num_classes))
    batch_arr = sharding.make_global_batch(local, mesh)
    rng = jax.random.key(1)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_arr, rng).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_dev = float(cost.get("flops", 0.0)) if cost else 0.0  # per device (the partitioned module)
    mem = memory_stats(compiled)
    losses, times = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, m = compiled(state, batch_arr, rng)
        loss = float(m["loss"])  # blocks, like the reference's loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(loss)
    med = float(np.median(times))
    profile = None
    if profile_dir:  # traced after the timed steps, so tracing does not slow what is reported
        trace_dir = os.path.join(profile_dir, name)
        os.makedirs(trace_dir, exist_ok=True)
        hlo = compiled.as_text()
        with open(os.path.join(trace_dir, "train_step.hlo.txt"), "w") as f:
            f.write(hlo)
        with jax.profiler.trace(trace_dir):
            for _ in range(profile_steps):
                state, m = compiled(state, batch_arr, rng)
                float(m["loss"])
        profile = dict(profile_breakdown(trace_dir, hlo, profile_steps), trace_dir=trace_dir,
                       traced_steps=profile_steps)
    dev = jax.devices()[0]
    rec = {"bench": name, "batch_size": batch, "global_batch": setup.global_batch, "num_classes": num_classes,
           "bf16": bool(bf16), "warmup": warmup, "steps": steps, "median_s": med, "min_s": min(times),
           "times_s": [round(t, 4) for t in times], "images_per_s": setup.global_batch / med,
           "compile_s": compile_s, "loss_first": losses[0], "loss_last": losses[-1],
           "all_losses_finite": bool(np.all(np.isfinite(losses))),
           "flops_per_step": flops_dev * jax.device_count(), "flops_per_step_per_device": flops_dev,
           "achieved_flops_per_s": flops_dev * jax.device_count() / med, "devices": jax.device_count(),
           "config": f"configs/{CASES[name][0]}.py:{CASES[name][1]}", "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if profile:
        rec["profile"] = profile
    if mem:
        rec["xla_peak_bytes_per_device"] = mem["peak_bytes"]
        rec["xla_memory"] = mem
    if jax.default_backend() == "cpu":
        rec["peak_mem_bytes"] = mem.get("peak_bytes")  # no allocator statistics on XLA:CPU
        rec["peak_mem_source"] = "xla memory_analysis (args + outputs - aliased + temps)"
        rec["cpu_threads"] = len(os.sched_getaffinity(0))  # XLA:CPU's intra-op pool: one thread per core
    else:
        stats = dev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            rec["peak_mem_bytes"] = int(stats["peak_bytes_in_use"])
            rec["peak_mem_source"] = "device.memory_stats()['peak_bytes_in_use'] (process-wide)"
        pk = peak_flops(dev.device_kind, bf16)
        if pk and flops_dev:
            rec["peak_flops_per_device"] = pk
            rec["mfu"] = flops_dev / med / pk
    return rec


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES, help=f"comma list of {ALL_CASES}, or 'all'")
    p.add_argument("--batch", type=int, default=None, help="per device (default 8 on CPU, 64 otherwise)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--compile-cache", default="", help="persistent XLA compilation cache directory")
    p.add_argument("--out", default="", help="also append the JSON lines to this file")
    p.add_argument("--profile", default="", metavar="DIR",
                   help="after the timed steps, trace --profile-steps more with jax.profiler into DIR/<case> "
                        "(TensorBoard's profile plugin or Perfetto read it; the optimised HLO is saved beside) "
                        "and add a per-instruction breakdown ('profile') to the JSON line")
    p.add_argument("--profile-steps", type=int, default=3)
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 0:
        p.error("need --steps >= 1 and --warmup >= 0")
    if a.compile_cache:
        jax.config.update("jax_compilation_cache_dir", a.compile_cache)
    batch = a.batch or (8 if jax.default_backend() == "cpu" else 64)
    names = list(CASES) if a.cases == "all" else [c for c in a.cases.split(",") if c]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"--cases: unknown {unknown}; known: {ALL_CASES}")
    for name in names:
        rec = emit(run_case(name, batch, a.steps, a.warmup, a.bf16, a.num_classes, a.profile, a.profile_steps))
        if a.out:
            with open(a.out, "a") as f:
                f.write(rec + "\n")


if __name__ == "__main__":
    main()
