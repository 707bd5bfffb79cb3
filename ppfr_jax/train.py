"""The training engine: one code path for 1 CPU, N GPUs and TPU pod slices.

``train_and_evaluate(config, workdir)`` builds a ``Mesh`` over every device
(axes ``data`` x ``model``), creates the train state already sharded
(``jax.eval_shape`` + ``jax.jit(out_shardings=...)``), and runs
``jax.jit(train_step, donate_argnums=0)``. The backbone is data-parallel;
the classification head's class axis is sharded over all devices (the
reference's "dist FC"): embeddings are all-gathered by XLA, logits stay
sharded by class, and the softmax normaliser and target logit are
cross-device reductions.

Checkpoints: Orbax ``CheckpointManager`` (async; latest-N plus best-by-DevTest
preservation) under ``<workdir>/checkpoints``; a workdir holding a checkpoint
is resumed automatically (state, step and data position), onto whatever mesh
the current run has. Logging: clu writers (TensorBoard, process 0) and
``ReportProgress`` (steps/s, ETA). A non-finite loss stops the run with the
step named; that update is never applied, so saved checkpoints stay good.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ppfr_jax import config_lib, tasks

CLASS_PAD = 128  # head width is a multiple of this (and of the device count): restores across meshes


class NonFiniteLossError(FloatingPointError):
    """An update made the loss, gradients or the new state non-finite; it was not applied or saved."""


class RunError(RuntimeError):
    """The run cannot start or go on (workdir in use, checkpoint unwritable or unreadable); names the path."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    model_state: Any  # {'batch_stats': ..., ['head_state': ...]}
    opt_state: Any
    bad_step: jax.Array  # -1, or the first step whose loss/gradients were not finite


# ----------------------------------------------------------------------------- distributed set-up


def maybe_initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when the launcher says we are one of several processes."""
    env = os.environ
    multi = (env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS")
             or int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
             or int(env.get("JAX_NUM_PROCESSES", "1")) > 1)
    if multi and not jax.distributed.is_initialized():
        kw = {}
        if env.get("JAX_COORDINATOR_ADDRESS"):
            kw = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
        jax.distributed.initialize(**kw)


def workdir_path(workdir: str):
    """An ``etils.epath.Path`` for a local directory (made absolute) or a URL such as ``gs://bucket/run``.

    Orbax, clu's writers and ``results.json`` all go through it, so a TPU pod can
    write straight to Cloud Storage.
    """
    from etils import epath
    return epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))


def create_mesh(config) -> Mesh:
    devices = np.asarray(jax.devices())
    model = max(int(config.mesh.get("model", 1)), 1)
    if devices.size % model:
        raise ValueError(f"config.mesh.model: {model} does not divide the {devices.size} devices")
    return Mesh(devices.reshape(devices.size // model, model), ("data", "model"))


def padded_num_classes(num_classes: int, num_devices: int) -> int:
    mult = math.lcm(CLASS_PAD, num_devices)
    return -(-num_classes // mult) * mult


def state_shardings(abstract_state, mesh: Mesh):
    """Head kernels (and their optimiser traces) sharded by class; everything else replicated."""
    def rule(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if "head" in names and names and names[-1] == "kernel" and getattr(leaf, "ndim", 0) == 2:
            return NamedSharding(mesh, P(None, ("data", "model")))
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(rule, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def make_global_batch(local: dict, mesh: Mesh) -> dict:
    """Per-host numpy batch -> global ``jax.Array``s sharded on the data axis."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in local.items()}


# ----------------------------------------------------------------------------- optimiser


def steps_per_epoch(config, dataset_size: int, global_batch: int) -> int:
    if config.get("steps_per_epoch", 0):
        return int(config.steps_per_epoch)
    return max(1, dataset_size // global_batch)


def make_schedule(config, spe: int) -> optax.Schedule:
    o = config.optim
    boundaries = {int(round(e * spe)): o.decay_factor for e in o.boundaries_epochs if e * spe > 0}
    main = optax.piecewise_constant_schedule(o.lr, boundaries)
    warm = int(round(o.get("warmup_epochs", 0.0) * spe))
    if warm <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warm), lambda s: main(s + warm)], [warm])


def path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def make_optimizer(config, task, params, schedule) -> optax.GradientTransformation:
    """SGD + momentum, weight decay masked to kernels, per-group LR multipliers, optional clipping."""
    o = config.optim
    mults = dict(o.get("lr_multipliers", {}) or {})
    labels = jax.tree_util.tree_map_with_path(lambda p, _: task.param_group(path_names(p)), params)
    decay_mask = jax.tree_util.tree_map_with_path(lambda p, _: task.decays(path_names(p)), params)

    def sgd(mult):
        sched = (lambda s: schedule(s) * mult) if mult != 1.0 else schedule
        return optax.chain(optax.add_decayed_weights(o.weight_decay, decay_mask),
                           optax.sgd(sched, momentum=o.momentum or None, nesterov=o.get("nesterov", False)))

    groups = {"default": sgd(1.0), "frozen": optax.set_to_zero()}
    for name, mult in mults.items():
        groups[name] = sgd(float(mult))
    used = set(jax.tree.leaves(labels))
    unknown = used - set(groups)
    if unknown:
        raise ValueError(f"config.optim.lr_multipliers: no entry for parameter group(s) {sorted(unknown)}")
    tx = optax.multi_transform(groups, labels)
    if o.get("grad_clip_norm", 0.0):
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    return tx


# ----------------------------------------------------------------------------- step


def create_train_state(task, tx, rng, example_batch) -> TrainState:
    variables = task.init(rng, example_batch["image"], example_batch["label"])
    params = variables.pop("params")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                      opt_state=tx.init(params), bad_step=jnp.full((), -1, jnp.int32))


def train_step(state: TrainState, batch, rng, *, task, tx, schedule):
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        return task.loss(params, state.model_state, batch, rng, train=True)

    (loss, (metrics, new_ms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # a non-finite step is never applied: the state (and any checkpoint of it) stays good
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=pick(new_params, state.params),
        model_state=pick(new_ms, state.model_state),
        opt_state=pick(new_opt, state.opt_state),
        bad_step=jnp.where((state.bad_step < 0) & ~ok, state.step, state.bad_step),
    )
    metrics = dict(metrics, learning_rate=schedule(state.step), grad_norm=grad_norm,
                   param_norm=optax.global_norm(state.params))
    return new_state, metrics


# ----------------------------------------------------------------------------- data


def synthetic_batches(config, global_batch: int, start_step: int, num_classes: int) -> Iterator[dict]:
    """Deterministic random batches (tests, benchmarks): batch k depends only on (seed, k).

    Each host yields its slice of the same global batch, so the training run does not
    depend on how many processes share it.
    """
    local = global_batch // jax.process_count()
    lo = jax.process_index() * local
    step = start_step
    while True:
        rng = np.random.default_rng([config.seed, step])
        images = rng.integers(0, 256, (global_batch, 112, 112, 3), dtype=np.uint8)
        labels = rng.integers(0, num_classes, (global_batch,), dtype=np.int32)
        yield {"image": images[lo:lo + local], "label": labels[lo:lo + local]}
        step += 1


def train_source(config, global_batch: int, start_step: int):
    """-> (iterator of per-host numpy batches, num_classes, dataset_size)."""
    if config.data.source == "synthetic":
        n = int(config.data.num_classes)
        return synthetic_batches(config, global_batch, start_step, n), n, max(global_batch * 10, 1)
    from ppfr_jax import input_pipeline  # TensorFlow enters here only
    return input_pipeline.train_source(config, global_batch, start_step)


def eval_source(config):
    """-> (images uint8 (N,112,112,3), issame (N//2,)) or None."""
    if not config.eval.get("pairs"):
        return None
    from ppfr_jax import evaluate
    return evaluate.load_verification_set(config.eval.pairs)


# ----------------------------------------------------------------------------- evaluation


def make_embed_fn(task, mesh):
    rep = NamedSharding(mesh, P())

    @jax.jit
    def embed(variables, images):
        e = task.embed(variables, images)
        if task.config.eval.get("flip", True):
            e = e + task.embed(variables, images[:, :, ::-1, :])
        return jax.lax.with_sharding_constraint(e.astype(jnp.float32), rep)

    return embed


def run_verification(embed, variables, images, issame, mesh, batch_size) -> dict:
    from ppfr_jax import evaluate
    n_dev = mesh.devices.size
    bs = max(n_dev, (batch_size // n_dev) * n_dev)
    outs = []
    for i in range(0, len(images), bs):
        chunk = images[i:i + bs]
        pad = bs - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        arr = jax.device_put(chunk, batch_sharding(mesh))
        outs.append(np.asarray(embed(variables, arr))[:bs - pad])
    emb = np.concatenate(outs)
    res = evaluate.verify(emb, issame)
    # squared L2 between unit embeddings (flip-summed); ppfr-verify turns it into a cosine
    return {"accuracy": float(res["accuracy_mean"]), "std": float(res["accuracy_std"]),
            "threshold": float(np.mean(res["best_thresholds"]))}


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, config):
    import orbax.checkpoint as ocp
    from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
    policies = [pp.LatestN(int(config.get("keep_checkpoints", 3)))]
    if int(config.get("keep_best", 1)) > 0:
        policies.append(pp.BestN(get_metric_fn=lambda m: m["devtest_accuracy"], reverse=False,
                                 n=int(config.keep_best), keep_checkpoints_without_metrics=False))
    opts = ocp.CheckpointManagerOptions(preservation_policy=pp.AnyPreservationPolicy(policies),
                                        enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(workdir_path(workdir) / "checkpoints", options=opts)


def save_checkpoint(mngr, state, meta: dict, metrics: dict | None = None):
    import orbax.checkpoint as ocp
    step = int(jax.device_get(state.step))
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              metrics=metrics, force=True)


def restore_checkpoint(mngr, abstract_state, step=None):
    import orbax.checkpoint as ocp
    step = mngr.latest_step() if step is None else step
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                       meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]


# ----------------------------------------------------------------------------- main loop


@dataclasses.dataclass
class Setup:
    mesh: Mesh
    task: Any
    tx: Any
    schedule: Any
    state_sharding: Any
    abstract_state: Any
    global_batch: int
    num_classes: int
    steps_per_epoch: int
    num_steps: int


def global_batch_size(config, mesh) -> int:
    gb = int(config.batch_size) if config.get("batch_size", 0) else int(config.batch_size_per_device) * mesh.size
    if gb % mesh.devices.shape[0] or gb % jax.process_count():
        raise ValueError(f"config.batch_size: global batch {gb} is not divisible by the {mesh.devices.shape[0]} "
                         f"data-parallel devices / {jax.process_count()} processes")
    return gb


def build(config, num_classes: int, dataset_size: int, mesh: Mesh | None = None) -> Setup:
    """Everything but data and state values: mesh, task, optimiser, shardings."""
    mesh = mesh or create_mesh(config)
    gb = global_batch_size(config, mesh)
    spe = steps_per_epoch(config, dataset_size, gb)
    num_steps = int(config.num_train_steps) if config.get("num_train_steps", 0) else int(round(config.num_epochs * spe))
    task = tasks.make_task(config, num_classes, padded_num_classes(num_classes, mesh.size))
    schedule = make_schedule(config, spe)
    example = {"image": jnp.zeros((2, 112, 112, 3), jnp.uint8), "label": jnp.zeros((2,), jnp.int32)}
    abstract_vars = jax.eval_shape(lambda r: task.init(r, example["image"], example["label"]), jax.random.key(0))
    tx = make_optimizer(config, task, abstract_vars["params"], schedule)
    abstract_state = jax.eval_shape(lambda r: create_train_state(task, tx, r, example), jax.random.key(0))
    shardings = state_shardings(abstract_state, mesh)
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  abstract_state, shardings)
    return Setup(mesh, task, tx, schedule, shardings, abstract_state, gb, num_classes, spe, num_steps)


def init_state(setup: Setup, rng) -> TrainState:
    example = {"image": jnp.zeros((2, 112, 112, 3), jnp.uint8), "label": jnp.zeros((2,), jnp.int32)}
    init = jax.jit(lambda r: create_train_state(setup.task, setup.tx, r, example), out_shardings=setup.state_sharding)
    return init(rng)


def compile_train_step(setup: Setup):
    import functools
    step = functools.partial(train_step, task=setup.task, tx=setup.tx, schedule=setup.schedule)
    bs = batch_sharding(setup.mesh)
    rep = NamedSharding(setup.mesh, P())
    return jax.jit(step, donate_argnums=0, in_shardings=(setup.state_sharding, bs, rep),
                   out_shardings=(setup.state_sharding, rep))


def _variables(state: TrainState) -> dict:
    return {"params": state.params, **state.model_state}


def restore_variables(workdir: str, step: int | None = None) -> tuple[dict, int]:
    """Params and model state of an engine checkpoint in ``workdir``, as numpy: ``(variables, step)``.

    Reads ``<workdir>/checkpoints/<step>/state`` (``train.save_checkpoint``'s
    layout: a ``TrainState`` with ``params`` and ``model_state``) without its
    optimiser state and without building the run that wrote it: the arrays
    come back unsharded, whatever mesh saved them. ``step=None``: the latest.

    Used by the stages that freeze another run's weights (DuetFace's client,
    MinusFace's generator) and by tools that only need the model.

    Raises:
      FileNotFoundError if there is no checkpoint.
    """
    import orbax.checkpoint as ocp

    root = workdir_path(workdir) / "checkpoints"
    steps = sorted(int(d.name) for d in root.iterdir() if d.name.isdigit()) if root.is_dir() else []
    steps = [s for s in steps if (root / str(s) / "state").is_dir()]
    if not steps:
        raise FileNotFoundError(f"no checkpoint under {root}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} under {root} (found steps {steps})")
    path = root / str(step) / "state"
    tree = ocp.StandardCheckpointHandler().metadata(path).tree  # the item, without step metadata
    wanted = {k: tree[k] for k in ("params", "model_state") if k in tree}
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), wanted)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    out = ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
    return {"params": out["params"], **out.get("model_state", {})}, step


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was started with: ``<workdir>/config.json`` (written at start) or ``results.json``."""
    wd = workdir_path(workdir)
    for name, key in (("config.json", None), ("results.json", "config")):
        f = wd / name
        if f.exists():
            try:
                d = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: not valid JSON ({e})") from None
            return ml_collections.ConfigDict(d[key] if key else d)
    raise FileNotFoundError(f"{wd}: neither config.json nor results.json; is it a ppfr_jax training workdir?")


def load_for_inference(workdir: str, step: int | None = None):
    """-> ``(task, variables, step)`` of a trained run, for embedding / protecting / serving.

    Rebuilds the task from the run's saved config and restores params and model
    state (no optimiser state) from its latest (or ``step``) checkpoint, as numpy.
    ``task.embed(variables, images)`` then gives the run's verification embeddings.
    """
    config = load_config(workdir)
    variables, step = restore_variables(workdir, step)
    head = variables["params"].get("head", {})
    kernel = next((v for v in jax.tree.leaves(head) if getattr(v, "ndim", 0) == 2), None)
    classes = int(kernel.shape[-1]) if kernel is not None else 1
    task = tasks.make_task(config, classes, classes)
    return task, variables, step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (resuming from ``workdir`` if it holds a checkpoint), evaluate, write results.json."""
    from clu import metric_writers, periodic_actions

    maybe_initialize_distributed()
    config_lib.validate(config, jax.device_count())
    workdir_path(workdir).mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # so an unfinished run can still be loaded (load_for_inference)
        (workdir_path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=1))
    t_start = time.time()
    mesh = create_mesh(config)
    gb = global_batch_size(config, mesh)

    # data first: the number of classes and the epoch size come from it
    mngr = checkpoint_manager(workdir, config)
    resume_step = mngr.latest_step() or 0
    batches, num_classes, dataset_size = train_source(config, gb, resume_step)
    setup = build(config, num_classes, dataset_size, mesh)
    rng = jax.random.key(config.seed)
    if resume_step:
        state, meta = restore_checkpoint(mngr, setup.abstract_state)
        logging.info("resumed from %s at step %d", workdir, resume_step)
    else:
        state = init_state(setup, jax.random.fold_in(rng, 0))
    step_fn = compile_train_step(setup)
    embed_fn = make_embed_fn(setup.task, mesh)
    eval_data = eval_source(config)

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if resume_step == 0:
        writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items() if isinstance(v, (int, float, str, bool))})
    hooks = [periodic_actions.ReportProgress(num_train_steps=setup.num_steps, writer=writer,
                                             every_steps=config.log_every_steps)]
    if jax.process_index() == 0:
        print(f"training {config.task}/{config.model.backbone} on {mesh.size} device(s) ({jax.default_backend()}), "
              f"global batch {gb}, {num_classes} classes, {setup.num_steps} steps "
              f"({setup.steps_per_epoch} per epoch), workdir {workdir}", flush=True)

    step_rng = jax.random.fold_in(rng, 1)
    meta_fn = lambda s: {"step": s, "data_position": s * gb, "global_batch": gb, "num_classes": num_classes}
    last_eval: dict = {}
    pending: list = []
    step = int(jax.device_get(state.step))
    try:
        while step < setup.num_steps:
            local = next(batches)
            batch = make_global_batch(local, mesh)
            state, metrics = step_fn(state, batch, step_rng)
            step += 1
            pending.append(metrics)
            for h in hooks:
                h(step)
            is_last = step == setup.num_steps
            if step % config.log_every_steps == 0 or is_last:
                _check_finite(state, workdir)
                summary = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
                pending = []
                writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
                if jax.process_index() == 0:
                    print(f"step {step}/{setup.num_steps} loss {summary['loss']:.4f} acc {summary['accuracy']:.3f} "
                          f"lr {summary['learning_rate']:.4g}", flush=True)
            do_eval = eval_data is not None and (is_last or (config.eval.every_steps and step % config.eval.every_steps == 0))
            if do_eval:
                r = run_verification(embed_fn, _variables(state), eval_data[0], eval_data[1], mesh,
                                     config.eval.batch_size)
                last_eval = r
                writer.write_scalars(step, {"eval/devtest_accuracy": r["accuracy"], "eval/devtest_std": r["std"]})
                if jax.process_index() == 0:
                    print(f"step {step}: DevTest verification accuracy {100 * r['accuracy']:.2f}% "
                          f"± {100 * r['std']:.2f}", flush=True)
            if step % config.checkpoint_every_steps == 0 or is_last:
                _check_finite(state, workdir)
                save_checkpoint(mngr, state, meta_fn(step),
                                {"devtest_accuracy": last_eval["accuracy"]} if do_eval else None)
    finally:
        mngr.wait_until_finished()
        mngr.close()
        writer.flush()

    results = {
        "config": config.to_dict(),
        "task": config.task,
        "steps": step,
        "wall_s": time.time() - t_start,
        "devtest_accuracy": last_eval.get("accuracy"),
        "devtest_std": last_eval.get("std"),
        "devtest_threshold": last_eval.get("threshold"),
        "num_classes": num_classes,
        "global_batch": gb,
        "devices": mesh.size,
        "backend": jax.default_backend(),
    }
    if jax.process_index() == 0:
        (workdir_path(workdir) / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def _check_finite(state: TrainState, workdir: str):
    bad = int(jax.device_get(state.bad_step))
    if bad >= 0:
        raise NonFiniteLossError(
            f"non-finite loss or gradients at step {bad + 1} (0-based update {bad}); the update was not applied "
            f"and checkpoints in {workdir}/checkpoints hold only finite states. Lower optim.lr, enable "
            f"optim.grad_clip_norm, or check the data.")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
