"""``ppfr-privacy --config configs/privacy.py:demo --workdir runs/privacy``: the privacy evaluation (``ppfr_jax.privacy``).

absl flags + ``config_flags`` (overrides ``--config.x=y``) in a private flag registry, so this module can be
imported beside ``ppfr_jax.cli.train``. A bad config value or a missing run is one line
``ppfr-privacy: error: ...`` and exit code 2.
"""
from __future__ import annotations

import sys

from ppfr_jax.cli import error_exit, run_cli

PROG = "ppfr-privacy"


def _main(argv: list[str] | None = None) -> int:
    from absl import flags, logging
    from ml_collections import config_flags

    from ppfr_jax import privacy

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "configs/privacy.py[:variant,...]", flag_values=fv,
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "where privacy.json, privacy.md, the PNG grids and TensorBoard go",
                        flag_values=fv)
    argv = list(sys.argv if argv is None else [PROG] + list(argv))
    if any(a in ("-h", "--help", "--helpshort") for a in argv[1:]):
        print(f"usage: {PROG} --config configs/privacy.py[:variant,...] --workdir DIR [--config.FIELD=VALUE ...]\n"
              f"\n{__doc__.strip()}\n\nflags:\n{fv.main_module_help() or fv}")
        return 0
    try:
        rest = fv(argv)
    except flags.Error as e:  # an unknown or malformed flag, a config file that does not load
        return error_exit(PROG, e)
    if len(rest) > 1:
        return error_exit(PROG, f"unexpected arguments {rest[1:]}")
    if fv.config is None or not fv.workdir:
        return error_exit(PROG, "--config and --workdir are required "
                                "(e.g. --config configs/privacy.py:demo --workdir runs/privacy)")
    logging.set_verbosity(logging.WARNING)
    privacy.run_privacy(fv.config, fv.workdir)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
