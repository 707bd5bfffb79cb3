"""Run I/O: a training workdir's checkpoints, config and safety, for the engine and every tool.

Layout of a workdir: ``config.json`` (written at start), ``checkpoints/<step>/``
(Orbax: ``state`` = the engine's ``TrainState``, ``meta`` = step, data position,
global batch, classes), ``results.json`` (at the end), ``.ppfr_run.lock``,
``damaged_checkpoints/``. Local paths or URLs (``gs://...``) through
``etils.epath`` (:func:`workdir_path`).

* engine side: :func:`checkpoint_manager`, :func:`save_checkpoint`,
  :func:`restore_checkpoint`, :func:`restore_newest_intact` (skips damaged
  checkpoints), :func:`quarantine`, :func:`workdir_lock`, :func:`check_writable`;
* tool side: :func:`restore_variables` (params + model state as numpy, any mesh),
  :func:`load_run_config`, :func:`load_frozen` (a frozen part of an earlier run,
  shape-checked, with how to make it when missing).

Errors: ``RunError`` / ``CheckpointMismatch`` name the path; missing runs raise
``FileNotFoundError`` subclasses. No function here imports the engine.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ppfr_jax.config_lib import ConfigError
from ppfr_jax.errors import RunError


def workdir_path(workdir: str):
    """An ``etils.epath.Path`` for a local directory (made absolute) or a URL such as ``gs://bucket/run``.

    Orbax, clu's writers and ``results.json`` all go through it, so a TPU pod can
    write straight to Cloud Storage.
    """
    from etils import epath
    return epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of ``tree`` is finite (a scalar bool array)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, config):
    import orbax.checkpoint as ocp
    from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
    # at least the latest: no setting may delete the only checkpoint (validate refuses 0 as well)
    policies = [pp.LatestN(max(1, int(config.get("keep_checkpoints", 3))))]
    if int(config.get("keep_best", 1)) > 0:
        # the mean verification accuracy over config.eval's sets; "devtest_accuracy" in runs written before them
        policies.append(pp.BestN(get_metric_fn=lambda m: m.get("eval_mean_accuracy", m.get("devtest_accuracy")),
                                 reverse=False,
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
    if (any(m.startswith("model_state.frozen.generator.") for m in missing)
            and any(e.startswith("params.generator.") for e in extra)):
        raise CheckpointMismatch(
            f"{step_dir} is a MinusFace stage-2 checkpoint written before the frozen generator moved from "
            f"params/generator to frozen/generator: it still deploys and evaluates (ppfr-protect, ppfr-eval, "
            f"ppfr-privacy read both layouts), but to train further start a new workdir")
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


def restore_newest_intact(workdir: str, abstract_state, num_classes: int, log=print):
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
                repad = check_checkpoint_matches(root / str(step), abstract_state, num_classes)
                state, meta = restore_checkpoint(ckptr, abstract_state, root / str(step), repad=repad)
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


# ----------------------------------------------------------------------------- reading a run


def restore_variables(workdir: str, step: int | None = None) -> tuple[dict, int]:
    """Params and model state of an engine checkpoint in ``workdir``, as numpy: ``(variables, step)``.

    Reads ``<workdir>/checkpoints/<step>/state`` (:func:`save_checkpoint`'s
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


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
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


def load_frozen(workdir: str, path: tuple[str, ...] | Mapping[str, tuple[str, ...]], *, field: str, what: str,
                how_to_make: str,
                want: Any = None, mismatch_hint: str = "", step: int | None = None,
                not_found: type[FileNotFoundError] = FileNotFoundError) -> tuple[Any, int]:
    """A frozen part of an earlier run (DuetFace's client, MinusFace's generator), shape-checked.

    Args:
      workdir: the earlier run's workdir ('' = not given).
      path: keys into its variables, e.g. ``("params", "generator")``; or ``{name: keys}`` for a part
        spread over collections (``{"params": ("params", "backbone"), "batch_stats": (...)}``), which
        then comes back as ``{name: sub-tree}`` (and ``want`` has the same names).
      field: the config field (or flag) that named ``workdir``, quoted in every error.
      what: what the part is for, e.g. ``"MinusFace stage 2 freezes the generator of a stage-1 run"``.
      how_to_make: the command that trains such a run, quoted when it is missing.
      want: a pytree of arrays / ShapeDtypeStructs with the shapes this model needs (None: no check).
      mismatch_hint: appended to the shape-mismatch error (which setting to change).
      step: the checkpoint step (None / 0: the latest).
      not_found: the ``FileNotFoundError`` subclass to raise when the run or the part is missing.

    Returns:
      ``(part, step)``: the sub-tree as numpy arrays and the step it was read from.

    Raises:
      not_found: ``workdir`` empty, without a checkpoint, or without ``path``; names the field and
        how to make the run.
      ValueError: the part's shapes differ from ``want``; names both and ``mismatch_hint``.
    """
    hint = f"Train it first:\n    {how_to_make}\nthen point this run at it: --{field}=<that workdir>"
    if not workdir:
        raise not_found(f"{field} is empty: {what} and needs its workdir. " + hint)
    try:
        variables, step = restore_variables(workdir, step or None)
    except FileNotFoundError as e:
        raise not_found(f"{field}={workdir!r}: {e}; {what}. " + hint) from None
    def take(keys):
        part: Any = variables
        for i, key in enumerate(keys):
            if not isinstance(part, Mapping) or key not in part:
                have = sorted(part) if isinstance(part, Mapping) else type(part).__name__
                raise not_found(f"{field}={workdir!r}: the checkpoint of step {step} has no "
                                f"{'/'.join(keys[:i + 1])} (found {have}); is it the right kind of run? {what}. "
                                + hint)
            part = part[key]
        return part

    named = isinstance(path, Mapping)
    part = {name: take(keys) for name, keys in path.items()} if named else take(path)
    if want is not None:
        got_s = jax.tree.map(lambda a: tuple(np.shape(a)), part)
        want_s = jax.tree.map(lambda a: tuple(a.shape), want)
        if got_s != want_s:
            where = ", ".join("/".join(k) for k in path.values()) if named else "/".join(path)
            raise ConfigError(f"{field}={workdir!r}: {where} saved at step {step} does not have the shapes "
                             f"this config needs" + (f"; {mismatch_hint}" if mismatch_hint else ""))
    return part, step
