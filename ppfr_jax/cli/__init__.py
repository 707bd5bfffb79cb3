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

# What the commands turn on for the CPU unless told not to (``PPFR_CPU_DEFAULTS=0``) or the user set it.
# (1) XLA:CPU: YNNPACK for dots and reductions only: BatchNorm's statistics are reductions XLA:CPU's own loops
# are slow at, and jax 0.10's default also routes elementwise fusions to YNNPACK, which materialises every
# broadcast operand. (2) glibc malloc: transparent huge pages for large allocations (``glibc.malloc.hugetlb=1``,
# glibc >= 2.35, used where the kernel's THP mode is ``madvise``): XLA:CPU allocates its buffers afresh at every
# execution, and first-touch page faults on 4 KiB pages were a quarter of the DuetFace demo's CPU time (412 s
# of system time in a 14m46s run, 235M minor faults). Measured on the 2-core Xeon at batch 64
# (bench/RESULTS.md, "DuetFace demo pipeline"): demo server step 1.65 -> 1.37 s with (1), -> 1.19 s with both;
# client 0.59 -> 0.46 -> 0.31 s; the same losses to ~1e-5. A GPU/TPU backend ignores (1).
CPU_XLA_DEFAULTS = ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce",)
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "PPFR_CPU_DEFAULTS"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _opted_out(env) -> bool:
    return env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off")


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

    Takes effect only before JAX starts a backend (XLA reads ``XLA_FLAGS`` once, when the first backend
    is created). A flag is skipped when ``XLA_FLAGS`` already names it (the user's value wins), when
    ``PPFR_CPU_DEFAULTS=0``, or when the installed jaxlib does not know it (XLA aborts on unknown flags,
    and these are experimental).
    """
    env = os.environ if environ is None else environ
    if _opted_out(env):
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


def malloc_tunables(environ: MutableMapping[str, str] | None = None, libc: tuple[str, str] | None = None,
                    thp_mode: str | None = None) -> str | None:
    """-> the ``GLIBC_TUNABLES`` value that adds ``MALLOC_TUNABLE``, or None where it does not apply.

    None when opted out, when ``GLIBC_TUNABLES`` already sets ``glibc.malloc.hugetlb`` (the user's value
    wins), on a C library other than glibc >= 2.35 (``libc``: ``platform.libc_ver()``), or when the kernel's
    THP mode (``thp_mode``: the text of ``THP_MODE_FILE``) is not ``[madvise]`` (``[always]`` gives huge pages
    anyway, ``[never]`` none at all).
    """
    import platform
    env = os.environ if environ is None else environ
    if _opted_out(env):
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    name, version = libc if libc is not None else platform.libc_ver()
    try:
        if name != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
            return None
    except ValueError:
        return None
    if thp_mode is None:
        try:
            with open(THP_MODE_FILE) as f:
                thp_mode = f.read()
        except OSError:
            return None
    if "[madvise]" not in thp_mode:
        return None
    return ":".join(t for t in (current, MALLOC_TUNABLE) if t)


def apply_cpu_defaults() -> None:
    """What every command does first: ``apply_cpu_xla_defaults``, then (glibc only) a restart of the same
    command line with ``malloc_tunables``' value, which glibc reads at process start only.

    The restart is ``os.execve`` of ``sys.executable`` with ``sys.orig_argv``: same PID, same arguments,
    nothing run yet; the new process finds the tunable set and goes on. Skipped where ``sys.orig_argv``
    is unavailable or ``PPFR_CPU_DEFAULTS=0``.
    """
    apply_cpu_xla_defaults()
    tunables = malloc_tunables()
    argv = getattr(sys, "orig_argv", None)
    if tunables is None or not argv or not sys.executable:
        return
    env = dict(os.environ, GLIBC_TUNABLES=tunables)
    print(f"ppfr: restarting with GLIBC_TUNABLES={tunables} (huge pages for XLA's buffers; "
          f"{OPT_OUT}=0 turns this off)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(sys.executable, argv, env)


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
        apply_cpu_defaults()
    try:
        code = body(argv)
    except PpfrError as e:
        return error_exit(prog, e)
    return 0 if code is None else int(code)
