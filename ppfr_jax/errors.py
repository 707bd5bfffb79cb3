"""The project's error base: every CLI turns a ``PpfrError`` into ``prog: error: ...`` and exit code 2.

Each specific error keeps its builtin base as well (``ConfigError`` is a
``ValueError``, ``RunError`` a ``RuntimeError``, ...), so ``except ValueError``
in user code still catches what it caught before. ``ppfr_jax.cli`` holds the
runner that does the turning (:func:`ppfr_jax.cli.run_cli`).
"""
from __future__ import annotations


class PpfrError(Exception):
    """Base of every error this package raises for a user to fix (bad input, config, file or run state)."""


class RunError(PpfrError, RuntimeError):
    """The run cannot start or go on (workdir in use, checkpoint unwritable or unreadable); names the path."""


class NonFiniteLossError(PpfrError, FloatingPointError):
    """An update made the loss, gradients or the new state non-finite; it was not applied or saved."""


class CheckpointSaveError(RunError):
    """Saving a checkpoint failed; the run stopped at once (the checkpoints before it are intact)."""
