"""Command line: ``python -m ppfr_jax.main --config configs/arcface.py:demo --workdir runs/x``.

Also installed as ``ppfr-train``. Overrides: ``--config.num_train_steps=100``.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/<experiment>.py[:variant,...]", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, TensorBoard summaries and results.json go")
flags.mark_flags_as_required(["config", "workdir"])


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ppfr_jax import errors, train
    logging.set_verbosity(logging.WARNING)
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except errors.NonFiniteLossError as e:
        print(f"ppfr-train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except errors.RunError as e:
        print(f"ppfr-train: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # at once: after a failed save, Orbax's background threads could hold the interpreter's exit for their
        # 300 s timeout; the lock goes with the process, everything else was closed by train_and_evaluate
        os._exit(2)
    except errors.PpfrError as e:
        # a bad setting is the user's to fix: one line, no traceback
        print(f"ppfr-train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def run():
    app.run(_main)


if __name__ == "__main__":
    run()
