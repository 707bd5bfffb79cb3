"""The command-line tools, one module each; ``run_cli`` is how every one of them ends.

Each ``ppfr_jax/cli/<command>.py`` parses its flags, calls the library and
returns an exit code; ``pyproject.toml`` points the console scripts at their
``main``. A ``PpfrError`` (bad input, config, file or run state: the user's to
fix) becomes one line ``prog: error: <message>`` on stderr and exit code 2, as
argparse does for bad flags; anything else is a bug and keeps its traceback.
Progress goes through ``absl.logging``; ``print`` is for results only.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from ppfr_jax.errors import PpfrError

EXIT_USAGE = 2  # argparse's code for a bad command line; ours for any error the user can fix


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
    try:
        code = body(argv)
    except PpfrError as e:
        return error_exit(prog, e)
    return 0 if code is None else int(code)
