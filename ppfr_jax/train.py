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
the current run has (any device count: the head's padded class axis is
re-padded). Logging: clu writers (TensorBoard, process 0) and
``ReportProgress`` (steps/s, ETA).

What survives what (SECURITY.md has the full list):

* an update that makes the loss, the gradients or the new state non-finite is
  not applied, and the run stops naming the step: no checkpoint ever holds a
  non-finite state;
* a damaged or non-finite checkpoint is skipped at restart: the newest intact
  one is resumed, the skipped ones are moved to ``<workdir>/damaged_checkpoints``
  and named with the reason; with none intact the run stops naming them;
* one run per workdir: ``<workdir>/.ppfr_run.lock`` (``fcntl.flock``, released by
  the kernel however the holder ends, SIGKILL included);
* the checkpoint folder is tested for writing before the first step, and a
  failed save stops the run at once, naming the checkpoint path;
* a finished run run again prints its recorded results and changes nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import socket
import sys
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


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of ``tree`` is finite (a scalar bool array)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def train_step(state: TrainState, batch, rng, *, task, tx, schedule):
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        return task.loss(params, state.model_state, batch, rng, train=True)

    (loss, (metrics, new_ms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    # the new state too: a finite gradient times a huge learning rate can still overflow the parameters
    ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_params) & all_finite(new_opt)
          & all_finite(new_ms))
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
    # at least the latest: no setting may delete the only checkpoint (validate refuses 0 as well)
    policies = [pp.LatestN(max(1, int(config.get("keep_checkpoints", 3))))]
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


def restore_checkpoint(mngr, abstract_state, step=None, *, repad: bool = False):
    """-> ``(state, meta)`` of ``step`` (default: the latest) onto ``abstract_state``'s shapes and shardings.

    ``mngr``: a CheckpointManager, or an Orbax ``Checkpointer`` with ``step`` the
    checkpoint's folder. ``repad``: allow leaves whose stored shape differs
    (zero-padded or truncated to the target): only for the head's padded class
    axis, see :func:`check_checkpoint_matches`.
    """
    import orbax.checkpoint as ocp
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state, strict=not repad),
                              meta=ocp.args.JsonRestore())
    if isinstance(mngr, ocp.CheckpointManager):
        out = mngr.restore(mngr.latest_step() if step is None else step, args=args)
    else:
        out = mngr.restore(step, args=args)
    return out["state"], out["meta"]


class CheckpointMismatch(RunError):
    """The workdir's checkpoints are of another model or dataset than this config (not damage)."""


def _leaf_name(path) -> str:
    return ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def check_checkpoint_matches(step_dir, abstract_state, num_classes: int) -> bool:
    """Compare a checkpoint's stored shapes with the model's; -> True when the head must be re-padded.

    Only the head's class axis (padded to a multiple of the device count, see
    :func:`padded_num_classes`) may differ, and only in its padding: both widths
    must hold ``num_classes``. Raises CheckpointMismatch for anything else, and
    whatever Orbax raises for an unreadable checkpoint.
    """
    import orbax.checkpoint as ocp
    tree = ocp.StandardCheckpointHandler().metadata(step_dir / "state").tree
    stored = {getattr(m, "name", None): tuple(m.shape) for m in jax.tree.leaves(tree) if hasattr(m, "shape")}
    want = {_leaf_name(p): tuple(l.shape) for p, l in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    missing, extra = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
    if missing or extra:
        raise CheckpointMismatch(
            f"{step_dir} holds another model: {len(missing)} variable(s) of this config are not in it "
            f"(e.g. {missing[:2]}), {len(extra)} of its are not in this config (e.g. {extra[:2]}); "
            f"use a new workdir for a different model")
    repad = False
    for name, shape in want.items():
        got = stored[name]
        if got == shape:
            continue
        head_axis = ("head" in name.split(".") and len(got) == len(shape) and got[:-1] == shape[:-1]
                     and min(got[-1], shape[-1]) >= num_classes)
        if not head_axis:
            raise CheckpointMismatch(f"{step_dir}: {name} has shape {got}, this config needs {shape}; use a new "
                                     f"workdir for a different model")
        repad = True
    return repad


# ----------------------------------------------------------------------------- run safety

LOCK_FILE = ".ppfr_run.lock"
DAMAGED_DIR = "damaged_checkpoints"


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold ``<workdir>/.ppfr_run.lock`` exclusively for the whole run (process 0; local workdirs).

    ``fcntl.flock`` on an open file: the kernel releases it when the process
    ends, however it ends (SIGKILL, OOM kill, power loss of a container), so a
    dead run never blocks the next one and there is no stale lock to remove.
    The file records who holds it (pid, host, start time, command).

    Raises:
      RunError naming the other run when the workdir is in use.
    """
    if jax.process_index() != 0 or "://" in str(workdir):
        # other processes of this run share process 0's lock; object stores (gs://) have no flock
        yield
        return
    import fcntl
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            other = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
            who = (f"pid {other.get('pid')} on {other.get('host')}, started {other.get('started')}: "
                   f"{' '.join(other.get('argv', []))[:200]}")
        except (OSError, ValueError):
            who = "unknown"
        os.close(fd)
        raise RunError(f"workdir {workdir} is in use by another run ({who}); one run per workdir at a time: wait "
                       f"for it to finish, or use another --workdir (lock: {path})") from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock; the file stays (removing it would race with a waiting run)


def probe_write(folder) -> None:
    """Create and remove a file and a folder in ``folder`` (what a checkpoint save starts with). Raises OSError."""
    tag = f".write_probe-{socket.gethostname()}-{os.getpid()}-{jax.process_index()}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / tag).write_text("")
    (folder / tag).unlink()
    (folder / (tag + ".d")).mkdir()
    (folder / (tag + ".d")).rmdir()


def check_writable(folder) -> None:
    """:func:`probe_write` before the first step. Raises RunError naming the folder."""
    try:
        probe_write(folder)
    except OSError as e:
        raise RunError(f"checkpoint folder {folder} is not writable ({e.strerror or e}); nothing was trained: "
                       f"fix its permissions or space, or use another --workdir") from None


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the checkpoint folders under ``<workdir>/checkpoints`` (any state), ascending."""
    root = workdir_path(workdir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(d.name) for d in root.iterdir() if d.name.isdigit())


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def restore_newest_intact(workdir: str, setup: Setup, num_classes: int, log=print):
    """Restore the newest checkpoint that reads back whole and finite.

    Every newer one that fails (missing items, unreadable or damaged files, bad
    metadata, non-finite values) is skipped with its reason. A checkpoint of
    another model (CheckpointMismatch) is not damage: it stops the run.

    Returns:
      ``(state, meta, step, skipped)``; ``state`` None when there is no
      checkpoint at all; ``skipped`` [(step, reason)], newest first.
    Raises:
      RunError when checkpoints exist but none is intact (names them), CheckpointMismatch.
    """
    import orbax.checkpoint as ocp
    steps = checkpoint_steps(workdir)
    if not steps:
        return None, None, 0, []
    root = workdir_path(workdir) / "checkpoints"
    skipped: list[tuple[int, str]] = []
    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())  # reads one folder; no manager bookkeeping
    try:
        for step in reversed(steps):
            try:
                repad = check_checkpoint_matches(root / str(step), setup.abstract_state, num_classes)
                state, meta = restore_checkpoint(ckptr, setup.abstract_state, root / str(step), repad=repad)
                if not isinstance(meta, dict) or int(meta.get("step", -1)) != step:
                    raise ValueError(f"its metadata names step {meta.get('step') if isinstance(meta, dict) else meta}")
                if int(meta.get("num_classes", num_classes)) != num_classes:
                    raise CheckpointMismatch(f"{root / str(step)} was trained on {meta['num_classes']} classes, the "
                                             f"data now has {num_classes}; use a new workdir for another dataset")
                if int(jax.device_get(state.step)) != step:
                    raise ValueError(f"its state is at step {int(jax.device_get(state.step))}")
                if not bool(jax.device_get(jax.jit(all_finite)((state.params, state.opt_state, state.model_state)))):
                    raise ValueError("non-finite values in its parameters or optimiser state")
                return state, meta, step, skipped
            except (CheckpointMismatch, MemoryError, TimeoutError, ConnectionError, InterruptedError):
                # not damage: another model, or a passing failure of this host / its storage. Falling
                # back would move a good newer checkpoint aside and silently drop its progress.
                raise
            except Exception as e:  # noqa: BLE001  (Orbax / tensorstore / JSON: any other failure means damage)
                skipped.append((step, _short(e)))
                log(f"checkpoint {root / str(step)} is unusable ({_short(e)}); trying the previous one")
    finally:
        ckptr.close()
    raise RunError(f"no intact checkpoint under {root}: " + "; ".join(f"step {s}: {r}" for s, r in skipped)
                   + ". Move or delete them to start afresh.")


def quarantine(workdir: str, steps: list[int], log=print) -> None:
    """Move damaged checkpoint folders out of Orbax's way to ``<workdir>/damaged_checkpoints`` (process 0)."""
    if steps and jax.process_index() == 0:
        root = workdir_path(workdir)
        dest_root = root / DAMAGED_DIR
        dest_root.mkdir(parents=True, exist_ok=True)
        for s in steps:
            src = root / "checkpoints" / str(s)
            dest = dest_root / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}"
            n = 1
            while dest.exists():
                dest = dest_root / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
                n += 1
            try:
                shutil.move(os.fspath(src), os.fspath(dest))
            except OSError as e:
                raise RunError(f"cannot move damaged checkpoint {src} aside ({e}); move or delete it") from None
            log(f"moved damaged checkpoint {src} to {dest}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("ppfr_quarantine")


def _finished_results(workdir: str, config, step: int, setup: Setup, state, mesh) -> dict:
    """A finished run run again: its recorded results (re-evaluated only if they were never written)."""
    f = workdir_path(workdir) / "results.json"
    rec = None
    if f.exists():
        try:
            rec = json.loads(f.read_text())
        except ValueError:
            rec = None
    wants_eval = bool(config.eval.get("pairs"))
    if isinstance(rec, dict) and rec.get("steps") == step and (rec.get("devtest_accuracy") is not None
                                                                or not wants_eval):
        if jax.process_index() == 0:
            acc = rec.get("devtest_accuracy")
            what = (f"DevTest verification accuracy {100 * acc:.2f}% ± {100 * (rec.get('devtest_std') or 0):.2f}"
                    if acc is not None else "no verification set")
            print(f"run in {workdir} already finished at step {step} (num_train_steps {setup.num_steps}): {what} "
                  f"(from {f}); nothing was changed", flush=True)
        return rec
    # the final checkpoint exists but its results were never recorded (killed while writing them)
    eval_data = eval_source(config)
    last_eval = {}
    if eval_data is not None:
        last_eval = run_verification(make_embed_fn(setup.task, mesh), _variables(state), eval_data[0], eval_data[1],
                                     mesh, config.eval.batch_size)
    results = _results(config, step, 0.0, last_eval, setup, mesh)
    if jax.process_index() == 0:
        f.write_text(json.dumps(results, indent=1, default=str))
        print(f"run in {workdir} already finished at step {step}; its results were missing and are now recorded "
              f"in {f}" + (f": DevTest verification accuracy {100 * last_eval['accuracy']:.2f}%" if last_eval else ""),
              flush=True)
    return results


def _results(config, step, wall_s, last_eval, setup: Setup, mesh) -> dict:
    return {
        "config": config.to_dict(),
        "task": config.task,
        "steps": step,
        "wall_s": wall_s,
        "devtest_accuracy": last_eval.get("accuracy"),
        "devtest_std": last_eval.get("std"),
        "devtest_threshold": last_eval.get("threshold"),
        "num_classes": setup.num_classes,
        "global_batch": setup.global_batch,
        "devices": mesh.size,
        "backend": jax.default_backend(),
    }


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
    """Train (resuming from ``workdir`` if it holds a checkpoint), evaluate, write results.json.

    Raises:
      config_lib.ConfigError: a bad config value (before anything is written).
      RunError: the workdir is in use by another run, its checkpoint folder is not
        writable, a save failed, or no checkpoint is intact (each names the path).
      NonFiniteLossError: an update was non-finite (not applied, not saved).
    """
    maybe_initialize_distributed()
    config_lib.validate(config, jax.device_count())
    workdir_path(workdir).mkdir(parents=True, exist_ok=True)
    with workdir_lock(workdir):
        return _train_locked(config, workdir)


def _reposition(batches, config, gb: int, step: int):
    """The training iterator at ``step`` (after a fallback to an older checkpoint)."""
    if hasattr(batches, "step") and getattr(batches, "_it", None) is None:  # a TrainIterator not yet started
        batches.step = int(step)
        return batches
    return train_source(config, gb, step)[0]


def _train_locked(config, workdir: str) -> dict:
    from clu import metric_writers, periodic_actions

    t_start = time.time()
    mesh = create_mesh(config)
    gb = global_batch_size(config, mesh)
    ckdir = workdir_path(workdir) / "checkpoints"

    # data first: the number of classes and the epoch size come from it
    candidates = checkpoint_steps(workdir)
    batches, num_classes, dataset_size = train_source(config, gb, candidates[-1] if candidates else 0)
    setup = build(config, num_classes, dataset_size, mesh)
    rng = jax.random.key(config.seed)
    log = (lambda m: print(m, flush=True)) if jax.process_index() == 0 else (lambda m: None)
    state, _, resume_step, skipped = restore_newest_intact(workdir, setup, num_classes, log)
    if skipped:
        quarantine(workdir, [s for s, _ in skipped], log)
        log(f"resuming from step {resume_step} ({ckdir / str(resume_step)}); skipped damaged checkpoint(s): "
            + "; ".join(f"step {s} ({r})" for s, r in skipped))
    if state is not None and resume_step >= setup.num_steps:
        return _finished_results(workdir, config, resume_step, setup, state, mesh)
    if resume_step != (candidates[-1] if candidates else 0):
        batches = _reposition(batches, config, gb, resume_step)
    check_writable(ckdir)
    if jax.process_index() == 0:  # so an unfinished run can still be loaded (load_for_inference)
        (workdir_path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=1))
    if state is None:
        state = init_state(setup, jax.random.fold_in(rng, 0))
    else:
        logging.info("resumed from %s at step %d", workdir, resume_step)
    mngr = checkpoint_manager(workdir, config)
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
    saving: list[int] = []  # steps whose (asynchronous) save may still fail
    step = int(jax.device_get(state.step))

    def save_failed(e: BaseException) -> RunError:
        where = ckdir / str(saving[-1]) if saving else ckdir
        return RunError(f"saving the checkpoint {where} failed ({_short(e)}); the run stops here, at step {step}: "
                        f"the checkpoints before it are intact. Check the folder's permissions and free space.")

    failed = False
    try:
        while step < setup.num_steps:
            local = next(batches)
            batch = make_global_batch(local, mesh)
            state, metrics = step_fn(state, batch, step_rng)
            step += 1
            pending.append(metrics)
            try:
                mngr.check_for_errors()  # a background save that failed stops the run now, not minutes later
            except Exception as e:  # noqa: BLE001
                raise save_failed(e) from None
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
                try:
                    mngr.wait_until_finished()  # the previous save: its failure surfaces before a new one starts
                    saving.append(step)
                    # Orbax creates the step folder in a background thread; if that fails, its other threads wait
                    # 300 s for it (and hold the interpreter at exit): find an unwritable folder here instead
                    probe_write(ckdir)
                    save_checkpoint(mngr, state, meta_fn(step),
                                    {"devtest_accuracy": last_eval["accuracy"]} if do_eval else None)
                except Exception as e:  # noqa: BLE001
                    raise save_failed(e) from None
    except BaseException:
        failed = True
        raise
    finally:
        try:
            mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            if not failed:
                raise save_failed(e) from None
        finally:
            with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
                mngr.close()
            writer.flush()

    results = _results(config, step, time.time() - t_start, last_eval, setup, mesh)
    if jax.process_index() == 0:
        (workdir_path(workdir) / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def _check_finite(state: TrainState, workdir: str):
    bad = int(jax.device_get(state.bad_step))
    if bad >= 0:
        raise NonFiniteLossError(
            f"non-finite loss, gradients or updated state at step {bad + 1} (0-based update {bad}); the update was "
            f"not applied and checkpoints in {workdir}/checkpoints hold only finite states. Lower optim.lr, enable "
            f"optim.grad_clip_norm, or check the data.")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
