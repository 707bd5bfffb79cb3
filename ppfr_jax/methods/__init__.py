"""The privacy-preserving methods, the task registry the engine builds from, and the client/server contract.

``make_task(config, num_classes)`` builds the training task ``config.task``
names: ``arcface`` (``ppfr_jax.tasks``), ``duetface_client`` / ``duetface``
(``methods/duetface.py``), ``minusface_stage1`` / ``minusface_stage2`` /
``minusface_toy`` (``methods/minusface.py``). ``load_for_inference(workdir)``
rebuilds a trained run's task and variables for embedding.

The client/server contract: ``METHODS[name]`` is a class (``DuetFaceSplit``,
``MinusFaceSplit``) built with ``.from_config(run_config)`` (or from the task's
model: ``task.split``) whose instances have the same members for both methods:

- ``method``, ``tasks`` (the deployable ``config.task`` names), ``input_names``
  (``('images', <extra>)``), ``output_names`` (what is transmitted);
- ``input_specs(batch)``: [images (B, 112, 112, 3) float32 in [-1, 1], extra];
- ``split_variables(variables) -> (client_vars, server_vars)`` (each half alone:
  ``client_variables`` / ``server_variables``), from the engine's layout (a
  checkpoint, or ``init_variables(key)``); raises ``contract.MissingVariables``
  naming the missing sub-tree;
- ``client_fn(client_vars, images, extra) -> {output name: (B, ...)}``, what is
  transmitted; ``server_fn(server_vars, transmitted) -> (B, E)`` embeddings
  (not normalised). Both pure, jit- and export-able; each reads only its half;
- ``describe()``: method-specific facts a deployed client records.
"""
from __future__ import annotations

import jax

from ppfr_jax import checkpoints, tasks
from ppfr_jax.methods import duetface, minusface

METHODS = {"duetface": duetface.DuetFaceSplit, "minusface": minusface.MinusFaceSplit}
TASK_METHOD = {task: name for name, split in METHODS.items() for task in split.tasks}


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
