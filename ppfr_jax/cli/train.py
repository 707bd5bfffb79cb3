"""``ppfr-train`` (= ``python -m ppfr_jax.main``): train one run from an ml-collections config.

``ppfr-train --config configs/arcface.py:demo --workdir runs/x [--config.FIELD=VALUE ...]``
(absl flags + ``config_flags``). A workdir holding checkpoints is resumed; a
finished one prints its results. A pipeline config (``configs/duetface.py:demo``: a ``pipeline``
section, no stage named) runs the whole method instead (``ppfr_jax.pipeline.run_pipeline``: every
stage in its sub-folder, the baseline, the attack, ``report.md``), with the same exit codes. Exit codes: 0 done; 2 a bad config value or a
run that cannot start or go on (``ppfr-train: error: ...``, no traceback); 1 a
non-finite update (not applied, not saved).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

PROG = "ppfr-train"
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/<experiment>.py[:variant,...]", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, TensorBoard summaries (metrics.jsonl without "
                                     "TensorFlow) and results.json go")
flags.mark_flags_as_required(["config", "workdir"])


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ppfr_jax import errors, train
    from ppfr_jax.cli import error_exit
    logging.set_verbosity(logging.WARNING)
    try:
        if "pipeline" in FLAGS.config:
            from ppfr_jax import pipeline
            pipeline.run_pipeline(FLAGS.config, FLAGS.workdir)
        else:
            train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except errors.NonFiniteLossError as e:
        sys.exit(error_exit(PROG, e, 1))
    except errors.CheckpointSaveError as e:
        error_exit(PROG, e)
        # at once: after a failed save, Orbax's background threads could hold the interpreter's exit for their
        # 300 s timeout; the lock goes with the process, everything else was closed by train_and_evaluate
        os._exit(2)
    except errors.PpfrError as e:
        # a bad setting or a run that cannot start is the user's to fix: one line, no traceback
        sys.exit(error_exit(PROG, e))


def run():
    from ppfr_jax.cli import apply_cpu_defaults
    apply_cpu_defaults()  # before absl parses the config (a config file may import jax)
    app.run(_main)


if __name__ == "__main__":
    run()
