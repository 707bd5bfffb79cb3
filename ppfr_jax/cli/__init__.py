"""The command-line tools, one module each; ``run_cli`` is how every one of them ends.

Each ``ppfr_jax/cli/<command>.py`` parses its flags, calls the library and
returns an exit code; ``pyproject.toml`` points the console scripts at their
``main``. A ``PpfrError`` (bad input, config, file or run state: the user's to
fix) becomes one line ``prog: error: <message>`` on stderr and exit code 2, as
argparse does for bad flags; anything else is a bug and keeps its traceback.
Progress goes through ``absl.logging``; ``print`` is for results only.
"""
from __future__ import annotations

import glob
import mmap
import os
import sys
from typing import Callable, MutableMapping, Sequence

from ppfr_jax.errors import PpfrError

EXIT_USAGE = 2  # argparse's code for a bad command line; ours for any error the user can fix

# XLA:CPU flags the commands turn on unless told not to (``PPFR_XLA_CPU_DEFAULTS=0``) or the user set them.
# YNNPACK for dots and reductions only: BatchNorm's statistics are reductions XLA:CPU's own loops are slow at,
# and jax 0.10's default also routes elementwise fusions to YNNPACK, which materialises every broadcast
# operand. Measured on the 2-core Xeon (bench/RESULTS.md, "DuetFace demo pipeline"): DuetFace demo server step
# 1.65 -> 1.37 s, client 0.59 -> 0.44 s at batch 64, the same losses to ~1e-5. CPU-only: a GPU/TPU backend
# ignores it.
CPU_XLA_DEFAULTS = ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce",)
OPT_OUT = "PPFR_XLA_CPU_DEFAULTS"


def _xla_knows(flag_name: str) -> bool:
    """Whether the installed jaxlib's XLA defines ``flag_name`` (an unknown XLA_FLAGS entry aborts the process)."""
    import jaxlib  # the package directory only: importing it starts no backend
    needle = flag_name.encode()
    for path in glob.glob(os.path.join(os.path.dirname(jaxlib.__file__), "*.so")):
        try:
            if os.path.getsize(path) < 1 << 20:
                continue
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(needle) >= 0:
                    return True
        except (OSError, ValueError):
            continue
    return False


def apply_cpu_xla_defaults(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Append ``CPU_XLA_DEFAULTS`` to ``XLA_FLAGS`` where they are safe; -> the flags added.

    Called by every command before JAX starts a backend (XLA reads ``XLA_FLAGS`` once, when the first
    backend is created; later changes are ignored). A flag is skipped when ``XLA_FLAGS`` already names
    it (the user's value wins), when ``PPFR_XLA_CPU_DEFAULTS=0``, or when the installed jaxlib does not
    know it (XLA aborts on unknown flags, and these are experimental).
    """
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    current = env.get("XLA_FLAGS", "")
    added = []
    for flag in CPU_XLA_DEFAULTS:
        name = flag.split("=", 1)[0]
        if name in current or not _xla_knows(name.lstrip("-")):
            continue
        added.append(flag)
    if added:
        env["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added


def error_exit(prog: str, e: BaseException | str, code: int = EXIT_USAGE) -> int:
    """Print ``prog: error: e`` on stderr; -> ``code`` (the caller returns it)."""
    sys.stdout.flush()
    print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
    return code


def run_cli(prog: str, body: Callable[[Sequence[str] | None], int | None],
            argv: Sequence[str] | None = None) -> int:
    """``body(argv)``, with every ``PpfrError`` turned into ``prog: error: ...`` and exit code 2.

    Args:
      prog: the command's name, as the user typed it (``ppfr-eval``).
      body: parses ``argv`` (None: ``sys.argv[1:]``) and does the work; returns an exit code (None = 0).
    Returns:
      the exit code.
    """
    if argv is None:  # the real command line, not a caller inside a running process
        apply_cpu_xla_defaults()
    try:
        code = body(argv)
    except PpfrError as e:
        return error_exit(prog, e)
    return 0 if code is None else int(code)
