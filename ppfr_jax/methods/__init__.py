"""The privacy-preserving methods and the task registry the engine builds from.

``make_task(config, num_classes)`` builds the training task ``config.task``
names: ``arcface`` (``ppfr_jax.tasks``), ``duetface_client`` / ``duetface``
(DuetFace), ``minusface_stage1`` / ``minusface_stage2`` / ``minusface_toy``
(MinusFace). ``load_for_inference(workdir)`` rebuilds a trained run's task and
variables for embedding, protecting and serving.
"""
from __future__ import annotations

import jax

from ppfr_jax import checkpoints, tasks
from ppfr_jax.models import duetface as _duetface  # noqa: F401  (registers duetface_client, duetface)
from ppfr_jax.models import minusface as _minusface  # noqa: F401  (registers minusface_*)


def make_task(config, num_classes: int, padded_classes: int | None = None) -> tasks.RecognitionTask:
    """The task ``config.task`` names (default ``arcface``).

    Raises:
      ValueError naming the unknown task and the known ones.
    """
    name = config.get("task", "arcface")
    if name not in tasks.TASKS:
        raise ValueError(f"config.task: unknown task {name!r}; known: {sorted(tasks.TASKS)}")
    return tasks.TASKS[name](config, num_classes, padded_classes)


def load_for_inference(workdir: str, step: int | None = None):
    """-> ``(task, variables, step)`` of a trained run, for embedding / protecting / serving.

    Rebuilds the task from the run's saved config and restores params and model
    state (no optimiser state) from its latest (or ``step``) checkpoint, as numpy.
    ``task.embed(variables, images)`` then gives the run's verification embeddings.

    Raises:
      FileNotFoundError: no run config or no checkpoint in ``workdir``.
    """
    config = checkpoints.load_run_config(workdir)
    variables, step = checkpoints.restore_variables(workdir, step)
    head = variables["params"].get("head", {})
    kernel = next((v for v in jax.tree.leaves(head) if getattr(v, "ndim", 0) == 2), None)
    classes = int(kernel.shape[-1]) if kernel is not None else 1
    return make_task(config, classes, classes), variables, step
