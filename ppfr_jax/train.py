"""The training engine: one code path for 1 CPU, N GPUs and TPU pod slices.

``train_and_evaluate(config, workdir)`` builds a ``Mesh`` over every device
(axes ``data`` x ``model``), creates the train state already sharded and runs
``jax.jit(train_step, donate_argnums=0)``: the backbone data-parallel, the
classification head's class axis sharded over all devices (the reference's
"dist FC"). Checkpoints: Orbax under ``<workdir>/checkpoints`` (latest-N plus
the best by mean verification accuracy); a workdir holding one is resumed automatically (state, step,
data position) on any device count. Logging: TensorBoard (process 0) and
steps/s, ETA. Verification: every set of ``config.eval`` (``config_lib.eval_set_specs``: the
demo DevTest named ``devtest``, or named benchmarks such as the papers' five .bin files) every
``eval.every_steps`` and at the end, logged as ``eval/<name>/accuracy`` (std, threshold) and
``eval/mean_accuracy``, recorded in ``results.json`` under ``eval_sets``. A non-finite update stops the run before it is applied;
damaged checkpoints are skipped; one run per workdir (``.ppfr_run.lock``);
an unwritable checkpoint folder stops the run; a finished run re-prints its
results (SECURITY.md has the full list). Details: README, Differences from
the reference, Training engine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ppfr_jax import config_lib, data, methods
from ppfr_jax.checkpoints import (_short, all_finite, check_writable, checkpoint_manager, checkpoint_steps,
                                  probe_write, quarantine, restore_newest_intact, save_checkpoint, workdir_lock,
                                  workdir_path)
from ppfr_jax.errors import CheckpointSaveError, NonFiniteLossError
from ppfr_jax.evaluate.evaluator import EvalSuite
from ppfr_jax.optim import make_optimizer, make_schedule, steps_per_epoch
from ppfr_jax.writers import JsonlMetricWriter, metric_writer  # noqa: F401  (train.JsonlMetricWriter, as before)
from ppfr_jax.sharding import (batch_sharding, create_mesh, global_batch_size, make_global_batch,
                               maybe_initialize_distributed, padded_num_classes, state_shardings)

@flax.struct.dataclass
class TrainState:
    """What a checkpoint holds. ``step``: int32 scalar, updates applied so far; ``params``: the task's
    ``params`` collection; ``model_state``: its other collections (``batch_stats``, ``head_state``,
    ``frozen``); ``opt_state``: optax state; ``bad_step``: int32 scalar, -1 or the first non-finite step."""

    step: jax.Array
    params: Any
    model_state: Any  # {'batch_stats': ..., ['head_state': ...]}
    opt_state: Any
    bad_step: jax.Array  # -1, or the first step whose loss/gradients were not finite






# ----------------------------------------------------------------------------- step


def create_train_state(task, tx, rng, example_batch) -> TrainState:
    """A fresh state: ``task.init(rng, images, labels)`` split into params and model state, ``tx.init(params)``.

    Args:
      task: a ``tasks.RecognitionTask`` (or subclass).
      tx: the optax transformation (``optim.make_optimizer``).
      rng: a ``jax.random`` key.
      example_batch: ``{'image': uint8 (B, 112, 112, 3), 'label': int32 (B,)}``; only shapes matter.
    Returns:
      a ``TrainState`` at step 0.
    """
    variables = task.init(rng, example_batch["image"], example_batch["label"])
    params = variables.pop("params")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                      opt_state=tx.init(params), bad_step=jnp.full((), -1, jnp.int32))




def train_step(state: TrainState, batch, rng, *, task, tx, schedule):
    """One SGD update; a non-finite one is not applied (``bad_step`` records it).

    Args:
      state: the current ``TrainState`` (donated by ``compile_train_step``).
      batch: the global batch, ``{'image': uint8 (B, 112, 112, 3), 'label': int32 (B,)}`` plus the fields the
        task reads (``landmarks`` float32 (B, 98, 2), ``roi`` (B, 112, 112, 1), ``perms`` (B, n, 192)).
      rng: the run's step key; folded with ``state.step`` so each step draws its own randomness.
      task, tx, schedule: the task, its optax transformation and the LR schedule (``Setup``).
    Returns:
      ``(new_state, metrics)``; metrics are scalars: ``loss``, ``accuracy``, the task's extra terms,
      ``learning_rate``, ``grad_norm``, ``param_norm``.
    """
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


# ----------------------------------------------------------------------------- evaluation


def make_evaluator(config, setup: Setup) -> EvalSuite | None:
    """The verification sets of ``config.eval`` (None without any): the task's embedding, sharded."""
    return EvalSuite.from_config(config, setup.task.embed, batch_sharding(setup.mesh))


def _eval_scalars(r: dict) -> dict:
    """An ``EvalSuite.run`` result -> ``eval/<name>/accuracy|std|threshold``, ``eval/mean_accuracy`` (+ the devtest set's
    pre-sets tags ``eval/devtest_accuracy``, ``eval/devtest_std``)."""
    out = {f"eval/{n}/{k}": v[k] for n, v in r["sets"].items() for k in ("accuracy", "std", "threshold")}
    out["eval/mean_accuracy"] = r["mean_accuracy"]
    if "devtest" in r["sets"]:  # the tags runs wrote before named sets: a resumed run's curve stays one curve
        out["eval/devtest_accuracy"] = r["sets"]["devtest"]["accuracy"]
        out["eval/devtest_std"] = r["sets"]["devtest"]["std"]
    return out


def _eval_line(step: int, r: dict) -> str:
    """The console line of one evaluation (the DevTest form bench/log_curve.py reads, when it is the one set)."""
    s = r["sets"]
    if list(s) == ["devtest"]:
        return f"step {step}: DevTest verification accuracy {100 * s['devtest']['accuracy']:.2f}% " \
               f"± {100 * s['devtest']['std']:.2f}"
    each = ", ".join(f"{n} {100 * v['accuracy']:.2f}% ± {100 * v['std']:.2f}" for n, v in s.items())
    return f"step {step}: verification accuracy {each}; mean {100 * r['mean_accuracy']:.2f}%"


def _finished_results(workdir: str, config, step: int, setup: Setup, state, mesh) -> dict:
    """A finished run run again: its recorded results (re-evaluated only if they were never written)."""
    f = workdir_path(workdir) / "results.json"
    rec = None
    if f.exists():
        try:
            rec = json.loads(f.read_text())
        except ValueError:
            rec = None
    names = list(config_lib.eval_set_specs(config))
    if isinstance(rec, dict) and rec.get("steps") == step:  # recorded: print it, change nothing
        if jax.process_index() == 0:
            acc, sets = rec.get("devtest_accuracy"), rec.get("eval_sets") or {}
            if sets and list(sets) != ["devtest"]:
                what = "verification accuracy " + ", ".join(f"{n} {100 * v['accuracy']:.2f}%" for n, v in sets.items())
            elif acc is not None:
                what = f"DevTest verification accuracy {100 * acc:.2f}% ± {100 * (rec.get('devtest_std') or 0):.2f}"
            else:
                what = "no verification set"
            missing = [n for n in names if n not in sets and not (n == "devtest" and acc is not None)]
            print(f"run in {workdir} already finished at step {step} (num_train_steps {setup.num_steps}): {what} "
                  f"(from {f}); nothing was changed", flush=True)
            if missing:
                print(f"  the sets {missing} of this config were not evaluated when the run finished; evaluate the "
                      f"run on them with ppfr-eval --model ppfr --checkpoint {workdir} --pairs <set>", flush=True)
        return rec
    # the final checkpoint exists but its results were never recorded (killed while writing them)
    evaluator = make_evaluator(config, setup)
    last_eval = evaluator.run(_variables(state)) if evaluator is not None else {}
    results = _results(config, step, 0.0, last_eval, setup, mesh)
    if jax.process_index() == 0:
        f.write_text(json.dumps(results, indent=1, default=str))
        print(f"run in {workdir} already finished at step {step}; its results were missing and are now recorded "
              f"in {f}" + (": " + _eval_line(step, last_eval).split(": ", 1)[1] if last_eval else ""), flush=True)
    return results


def _report_skipped(batches, reported: int, log) -> int:
    """Say how many training records ``data.skip_bad`` has skipped since ``reported``; -> the count now.

    ``batches.skipped`` (``TrainIterator`` / ``TfdsIterator``): one message per record skipped, at listing
    (e.g. a truncated ``train.rec``) or when a batch failed to decode.
    """
    skipped = list(getattr(batches, "skipped", None) or ())
    if len(skipped) > reported:
        new = skipped[reported:]
        more = f" (+ {len(new) - 3} more)" if len(new) > 3 else ""
        log(f"data: {len(new)} bad training record(s) skipped (data.skip_bad=True), {len(skipped)} in all; "
            + "; ".join(new[:3]) + more)
    return len(skipped)


def _results(config, step, wall_s, last_eval, setup: Setup, mesh, skipped: int = 0, loader: str | None = None) -> dict:
    """results.json: ``eval_sets`` {name: accuracy, std, threshold, pairs} and their mean; ``devtest_*``: the set named devtest."""
    dev = (last_eval.get("sets") or {}).get("devtest", {})
    return {
        "config": config.to_dict(),
        "task": config.task,
        "steps": step,
        "wall_s": wall_s,
        "devtest_accuracy": dev.get("accuracy"),
        "devtest_std": dev.get("std"),
        "devtest_threshold": dev.get("threshold"),
        "eval_sets": last_eval.get("sets", {}),
        "eval_mean_accuracy": last_eval.get("mean_accuracy"),
        "data_skipped": skipped,  # training records skipped by data.skip_bad
        "data_loader": loader,  # "tf" / "numpy" for the listed sources (what data.loader resolved to), else None
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




def build(config, num_classes: int, dataset_size: int, mesh: Mesh | None = None) -> Setup:
    """Everything but data and state values: mesh, task, optimiser, shardings.

    Args:
      config: a validated training config.
      num_classes: identities in the training data (the head is padded to ``sharding.padded_num_classes``).
      dataset_size: training images (sets the epoch length unless ``config.steps_per_epoch``).
      mesh: the device mesh (default ``sharding.create_mesh(config)``).
    Returns:
      a ``Setup``: mesh, task, tx, schedule, state shardings, the abstract (sharded) state, global batch,
      classes, steps per epoch and the run's total steps.
    Raises:
      ValueError: a global batch the data-parallel devices / processes do not divide; unknown task.
    """
    mesh = mesh or create_mesh(config)
    gb = global_batch_size(config, mesh)
    spe = steps_per_epoch(config, dataset_size, gb)
    num_steps = int(config.num_train_steps) if config.get("num_train_steps", 0) else int(round(config.num_epochs * spe))
    task = methods.make_task(config, num_classes, padded_num_classes(num_classes, mesh.size))
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
    """A fresh ``TrainState`` created directly in its shardings (``jax.jit(out_shardings=...)``): never whole on one
    device. ``rng``: a ``jax.random`` key."""
    example = {"image": jnp.zeros((2, 112, 112, 3), jnp.uint8), "label": jnp.zeros((2,), jnp.int32)}
    init = jax.jit(lambda r: create_train_state(setup.task, setup.tx, r, example), out_shardings=setup.state_sharding)
    return init(rng)


def compile_train_step(setup: Setup):
    """``jax.jit(train_step)`` for this setup: state donated and sharded as ``setup.state_sharding``, the batch
    sharded on the ``data`` axis, rng and metrics replicated. Call as ``step_fn(state, batch, rng)`` with
    ``batch`` from ``sharding.make_global_batch``; -> ``(new_state, metrics)``."""
    step = functools.partial(train_step, task=setup.task, tx=setup.tx, schedule=setup.schedule)
    bs = batch_sharding(setup.mesh)
    rep = NamedSharding(setup.mesh, P())
    return jax.jit(step, donate_argnums=0, in_shardings=(setup.state_sharding, bs, rep),
                   out_shardings=(setup.state_sharding, rep))


def _variables(state: TrainState) -> dict:
    return {"params": state.params, **state.model_state}




def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress=None) -> dict:
    """Train (resuming from ``workdir`` if it holds a checkpoint), evaluate, write results.json.

    Every log line shows the steps/s since the previous one and the run's ETA; ``progress``, if given, is
    called once before the first step as ``progress(start_step, num_steps, None)`` (the resume step; its
    return value is ignored), then there as ``progress(step, num_steps, steps_per_s)`` and the string it returns is appended
    (``ppfr_jax.pipeline`` adds the whole pipeline's ETA this way).

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
        return _train_locked(config, workdir, progress)


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1h02m05s'``, ``65`` -> ``'1m05s'``, ``4.2`` -> ``'4s'`` (for logs and tables)."""
    s = int(round(max(0.0, float(seconds))))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _reposition(batches, config, gb: int, step: int):
    """The training iterator at ``step`` (after a fallback to an older checkpoint)."""
    if hasattr(batches, "reposition"):  # the listed sources' loaders (RecordStream)
        batches.reposition(step)
        return batches
    return data.train_source(config, gb, step)[0]


def _metric_writer_and_hooks(workdir: str, config, num_steps: int, log):
    """:func:`metric_writer` and clu's ReportProgress hook (none with the JSON-lines writer: the console
    line still shows steps/s and the ETA)."""
    writer = metric_writer(workdir, just_logging=jax.process_index() > 0, log=log)
    if isinstance(writer, JsonlMetricWriter):
        return writer, []
    from clu import periodic_actions
    return writer, [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                                    every_steps=config.log_every_steps)]


def _train_locked(config, workdir: str, progress=None) -> dict:
    t_start = time.time()
    mesh = create_mesh(config)
    gb = global_batch_size(config, mesh)
    ckdir = workdir_path(workdir) / "checkpoints"

    # data first: the number of classes and the epoch size come from it
    candidates = checkpoint_steps(workdir)
    batches, num_classes, dataset_size = data.train_source(config, gb, candidates[-1] if candidates else 0)
    setup = build(config, num_classes, dataset_size, mesh)
    rng = jax.random.key(config.seed)
    log = (lambda m: print(m, flush=True)) if jax.process_index() == 0 else (lambda m: None)
    state, meta, resume_step, skipped = restore_newest_intact(workdir, setup.abstract_state, num_classes, log)
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
    evaluator = make_evaluator(config, setup)

    loader = getattr(batches, "loader", None)  # "tf" / "numpy" for the listed sources, else None
    if loader == "numpy":
        why = (f"data.loader=auto: TensorFlow does not import here: {data.TF_IMPORT_ERROR}"
               if config.data.get("loader", "auto") == "auto" else "data.loader=numpy")
        log(f"data: reading the records with the numpy loader ({why}); its flips differ from tf.data's draw")
    before = meta.get("data_loader") if isinstance(meta, dict) else None
    if before and loader and before != loader:
        log(f"note: steps 1-{resume_step} of this run were read by the {before!r} loader, the rest by "
            f"{loader!r}: same records in the same order, other random flips "
            f"(--config.data.loader={before} keeps the first)")
    writer, hooks = _metric_writer_and_hooks(workdir, config, setup.num_steps, log)
    if resume_step == 0:
        writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items() if isinstance(v, (int, float, str, bool))})
    if jax.process_index() == 0:
        print(f"training {config.task}/{config.model.backbone} on {mesh.size} device(s) ({jax.default_backend()}), "
              f"global batch {gb}, {num_classes} classes, {setup.num_steps} steps "
              f"({setup.steps_per_epoch} per epoch), workdir {workdir}", flush=True)

    n_skipped = _report_skipped(batches, 0, log)
    if progress is not None:
        progress(int(jax.device_get(state.step)), setup.num_steps, None)  # the start (resume) step
    step_rng = jax.random.fold_in(rng, 1)
    meta_fn = lambda s: {"step": s, "data_position": s * gb, "global_batch": gb, "num_classes": num_classes,
                         "data_loader": loader}
    last_eval: dict = {}
    pending: list = []
    saving: list[int] = []  # steps whose (asynchronous) save may still fail
    step = int(jax.device_get(state.step))
    t_log, step_log = time.time(), step  # steps/s between log lines (the first includes compilation)

    def save_failed(e: BaseException) -> CheckpointSaveError:
        where = ckdir / str(saving[-1]) if saving else ckdir
        return CheckpointSaveError(f"saving the checkpoint {where} failed ({_short(e)}); the run stops here, at step "
                                   f"{step}: the checkpoints before it are intact. Check the folder's permissions and "
                                   f"free space.")

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
                now = time.time()
                rate = (step - step_log) / max(now - t_log, 1e-9)
                t_log, step_log = now, step
                n_skipped = _report_skipped(batches, n_skipped, log)
                if n_skipped:
                    writer.write_scalars(step, {"data/skipped": n_skipped})
                if jax.process_index() == 0:
                    extra = progress(step, setup.num_steps, rate) if progress is not None else ""
                    acc = (f"acc {summary['accuracy']:.3f}" if "accuracy" in summary
                           else f"acc(sampled classes) {summary.get('accuracy_sampled', float('nan')):.3f}")
                    print(f"step {step}/{setup.num_steps} loss {summary['loss']:.4f} {acc} "
                          f"lr {summary['learning_rate']:.4g} | {rate:.2f} steps/s, ETA "
                          f"{format_duration((setup.num_steps - step) / max(rate, 1e-9))}{extra}", flush=True)
            do_eval = evaluator is not None and (is_last or (config.eval.every_steps and step % config.eval.every_steps == 0))
            if do_eval:
                r = evaluator.run(_variables(state))
                last_eval = r
                writer.write_scalars(step, _eval_scalars(r))
                if jax.process_index() == 0:
                    print(_eval_line(step, r), flush=True)
            if step % config.checkpoint_every_steps == 0 or is_last:
                _check_finite(state, workdir)
                try:
                    mngr.wait_until_finished()  # the previous save: its failure surfaces before a new one starts
                    saving.append(step)
                    # Orbax creates the step folder in a background thread; if that fails, its other threads wait
                    # 300 s for it (and hold the interpreter at exit): find an unwritable folder here instead
                    probe_write(ckdir)
                    save_checkpoint(mngr, state, meta_fn(step),
                                    {"eval_mean_accuracy": last_eval["mean_accuracy"]} if do_eval else None)
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

    n_skipped = _report_skipped(batches, n_skipped, log)
    results = _results(config, step, time.time() - t_start, last_eval, setup, mesh, n_skipped, loader)
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
