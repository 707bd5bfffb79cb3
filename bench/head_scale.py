"""Per-device memory of the class-sharded head at 1M and 10M identities, from XLA's own accounting.

    python bench/head_scale.py                                  # 1M,10M classes x 8,64 devices, 64x1 and 8x8 meshes
    python bench/head_scale.py --devices 64 --classes 10000000 --model-axis 8 --step engine

Nothing is allocated: the train step is lowered with abstract arguments
(``jax.ShapeDtypeStruct`` carrying the engine's shardings) and compiled, and
``compiled.memory_analysis()`` gives the per-device argument / output / alias /
temporary bytes of the partitioned program. Devices are fake CPU devices
(``--xla_force_host_platform_device_count``); the figures are those of XLA:CPU's
buffer assignment: a GPU/TPU compile has the same terms (state, gradient,
logit-sized temporaries) but will not assign the same bytes.

Two steps, selected by ``--step`` (default: both):

* ``engine``: the real thing, ``train.build`` + ``train.compile_train_step``
  on an ArcFace config (``configs/arcface.py``) with a tiny IR backbone
  (``--backbone ir_tiny``, 512-d embedding) so that the head dominates: same
  ``create_mesh``, ``padded_num_classes``, ``state_shardings`` (head kernel
  ``P(None, ('data', 'model'))``), ``make_optimizer`` (SGD momentum 0.9 +
  weight decay), donation of the state, and the task's loss.
* ``head``: the head alone, the same ``heads.MarginHead`` (ArcFace s=64 m=0.5),
  ``losses.softmax_cross_entropy``, optax SGD momentum and the same
  PartitionSpecs, fed (B, 512) embeddings sharded on ``data``: isolates the
  head from backbone activations.

Each case prints one JSON line (``bench/_common.emit``, with the command)
holding XLA's figures and the analytic expectation per device:
``head_state = 2 * C/D * 512 * 4`` (kernel + momentum), ``head_grad`` the
same again for the gradient, ``logits = B_global * C/D * 4`` (one float32
(B, C) buffer, of which the step keeps several live). Several device counts
in one call run as one subprocess each (the fake device count must be set
before jax starts).
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")


def _ints(s):
    return [int(float(x)) for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", default="1000000,10000000", help="comma-separated identity counts")
    p.add_argument("--devices", default="8,64", help="comma-separated fake device counts")
    p.add_argument("--model-axis", default="1,8",
                   help="comma-separated config.mesh.model sizes (data = devices // model); sizes that do not "
                        "divide the device count, or equal it, are skipped except 1")
    p.add_argument("--step", default="head,engine", help="head, engine or both")
    p.add_argument("--batch-per-device", type=int, default=64)
    p.add_argument("--embedding", type=int, default=512)
    p.add_argument("--sample-rate", type=float, default=1.0,
                   help="head.sample_rate (PartialFC v2): logits per device (global batch, int(r * C / D))")
    p.add_argument("--class-chunk", type=int, default=0,
                   help="head.class_chunk: columns per class shard whose logits exist at once (0 = the whole shard)")
    p.add_argument("--backbone", default="ir_tiny", help="engine step only")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    devices = _ints(a.devices)
    if len(devices) > 1:
        # one process per device count: XLA's fake device count is fixed when jax starts
        rc = 0
        for d in devices:
            # the child's own command line reproduces its rows alone (emit records it)
            argv_d = [sys.executable, sys.argv[0]] + _replace_devices(sys.argv[1:] if argv is None else argv, d)
            rc |= subprocess.call(argv_d)
        return rc
    n = devices[0]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import jax
    from _common import emit
    if jax.device_count() != n:
        raise SystemExit(f"--devices {n}: jax sees {jax.device_count()} {jax.default_backend()} devices "
                         f"(XLA_FLAGS={os.environ['XLA_FLAGS']!r}; JAX_PLATFORMS must be cpu for fake devices)")
    steps = [s.strip() for s in a.step.split(",") if s.strip()]
    for s in steps:
        if s not in ("head", "engine"):
            raise SystemExit(f"--step: unknown step {s!r}; expected head and/or engine")
    for model in _ints(a.model_axis):
        if model != 1 and (n % model or model == n):
            continue
        for c in _ints(a.classes):
            for s in steps:
                try:
                    rec = run_case(s, c, n, model, a)
                except Exception as e:  # report and go on: one case out of memory must not hide the others
                    rec = {"bench": "head_scale", "step": s, "num_classes": c, "devices": n,
                           "mesh": [n // model, model], "error": f"{type(e).__name__}: {str(e)[:500]}"}
                emit(rec)
    return 0


def _replace_devices(argv, d):
    out, skip = [], False
    for i, x in enumerate(argv):
        if skip:
            skip = False
            continue
        if x == "--devices":
            skip = True
            continue
        if x.startswith("--devices="):
            continue
        out.append(x)
    return out + ["--devices", str(d)]


def _arcface_config(num_classes, n, model, a):
    import arcface
    cfg = arcface.get_config("ir18")
    cfg.model.backbone = a.backbone
    cfg.model.embedding_size = a.embedding
    cfg.data.source = "synthetic"
    cfg.data.num_classes = num_classes
    cfg.batch_size = 0
    cfg.batch_size_per_device = a.batch_per_device
    cfg.eval.pairs = ""
    cfg.num_train_steps = 1
    cfg.mesh.model = model
    cfg.head.sample_rate = a.sample_rate
    cfg.head.class_chunk = a.class_chunk
    return cfg


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "peak_memory_in_bytes")
    out = {k.replace("_size_in_bytes", "_bytes").replace("_in_bytes", "_bytes"): int(getattr(m, k))
           for k in keys if hasattr(m, k)}
    # what must be resident at once: inputs + outputs (donated ones counted once) + temporaries
    out["live_bytes"] = out["argument_bytes"] + out["output_bytes"] - out.get("alias_bytes", 0) + out["temp_bytes"]
    return out


def run_case(step, num_classes, n, model, a) -> dict:
    import jax
    from ppfr_jax import sharding
    cfg = _arcface_config(num_classes, n, model, a)
    mesh = sharding.create_mesh(cfg)
    padded = sharding.padded_num_classes(num_classes, mesh.size)
    per_dev_classes = padded // mesh.size
    gb = sharding.global_batch_size(cfg, mesh)
    t0 = time.perf_counter()
    if step == "engine":
        compiled, extra = _compile_engine(cfg, mesh, num_classes, gb)
    else:
        compiled, extra = _compile_head(cfg, mesh, num_classes, padded, gb, a.sample_rate, a.class_chunk)
    compile_s = time.perf_counter() - t0
    f32 = 4
    head_param = per_dev_classes * a.embedding * f32
    rec = {
        "bench": "head_scale", "step": step, "num_classes": num_classes, "padded_classes": padded,
        "devices": mesh.size, "mesh": [int(mesh.devices.shape[0]), int(mesh.devices.shape[1])],
        "classes_per_device": per_dev_classes, "global_batch": gb, "embedding": a.embedding,
        "backbone": a.backbone if step == "engine" else None, "compile_s": round(compile_s, 1),
        **_memory(compiled),
        # analytic, per device
        "expect_head_kernel_bytes": head_param,
        "expect_head_state_bytes": 2 * head_param,  # kernel + momentum (arguments; aliased to outputs)
        "expect_head_state_and_grad_bytes": 3 * head_param,
        "sample_rate": a.sample_rate, "class_chunk": a.class_chunk,
        # one float32 (global batch, logit columns per device) buffer: the sampled columns, or one chunk of them
        "expect_logits_bytes": gb * _logit_columns(per_dev_classes, a.sample_rate, a.class_chunk) * f32,
        **extra,
    }
    return rec


def _logit_columns(per_dev_classes, sample_rate, class_chunk):
    cols = int(sample_rate * per_dev_classes) if sample_rate < 1 else per_dev_classes
    return min(cols, class_chunk) if class_chunk > 0 else cols


def _compile_engine(cfg, mesh, num_classes, gb):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ppfr_jax import sharding, train
    setup = train.build(cfg, num_classes, 10 * gb, mesh)
    step = train.compile_train_step(setup)
    bs = sharding.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((gb, 112, 112, 3), jnp.uint8, sharding=bs),
             "label": jax.ShapeDtypeStruct((gb,), jnp.int32, sharding=bs)}
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))
    compiled = step.lower(setup.abstract_state, batch, rng).compile()
    # replicated (backbone, BN, step) state bytes per device, for the reader to subtract
    rep = 0
    for leaf in jax.tree.leaves(setup.abstract_state):
        if leaf.sharding.spec == P():
            rep += leaf.size * leaf.dtype.itemsize
    return compiled, {"replicated_state_bytes": int(rep)}


def _compile_head(cfg, mesh, num_classes, padded, gb, sample_rate=1.0, class_chunk=0):
    import functools

    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ppfr_jax import heads
    h = cfg.head
    head = heads.MarginHead(num_classes=num_classes, kind=h.kind, scale=h.scale, margin=h.margin,
                            padded_classes=padded, sample_rate=sample_rate, num_shards=mesh.size,
                            class_chunk=class_chunk)
    o = cfg.optim
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay), optax.sgd(o.lr, momentum=o.momentum))
    d = cfg.model.embedding_size
    kernel_sh = NamedSharding(mesh, P(None, ("data", "model")))  # as sharding.state_shardings
    bs = NamedSharding(mesh, P("data"))
    rep = NamedSharding(mesh, P())
    params = {"kernel": jax.ShapeDtypeStruct((d, padded), jnp.float32)}
    opt = jax.eval_shape(tx.init, params)
    state_sh = jax.tree.map(lambda x: kernel_sh if x.ndim == 2 else rep, (params, opt))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), (params, opt), state_sh)

    def step(state, emb, labels):
        params, opt_state = state

        def loss_fn(p):
            # the task's loss: the head's cross-entropy (class-chunked when class_chunk > 0)
            return head.apply({"params": p}, emb, labels, train=True, return_loss=True,
                              rngs={"sample": jax.random.key(0)})["loss"]

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt_state = tx.update(g, opt_state, params)
        return (optax.apply_updates(params, upd), opt_state), loss

    fn = jax.jit(step, donate_argnums=0, in_shardings=(state_sh, bs, bs), out_shardings=(state_sh, rep))
    emb = jax.ShapeDtypeStruct((gb, d), jnp.float32, sharding=bs)
    labels = jax.ShapeDtypeStruct((gb,), jnp.int32, sharding=bs)
    return fn.lower(state, emb, labels).compile(), {}


if __name__ == "__main__":
    sys.exit(main())
