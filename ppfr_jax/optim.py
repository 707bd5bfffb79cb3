"""Optimiser and learning-rate schedule of the engine (SGD as the references use it).

``make_schedule``: piecewise-constant LR (``config.optim.lr`` times
``decay_factor`` at each of ``boundaries_epochs``) after an optional linear
warm-up. ``make_optimizer``: SGD + momentum, weight decay on the parameters the
task's ``decays(path)`` selects, one optimiser group per ``task.param_group``
(``'default'``, ``'frozen'`` = no update, or a name in
``config.optim.lr_multipliers``), optional global-norm clipping.
"""
from __future__ import annotations

import jax
import optax

from ppfr_jax.config_lib import ConfigError


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
        raise ConfigError(f"config.optim.lr_multipliers: no entry for parameter group(s) {sorted(unknown)}")
    tx = optax.multi_transform(groups, labels)
    if o.get("grad_clip_norm", 0.0):
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    return tx
