"""``ppfr-records``: write and check TFace training records.

``ppfr-records to-tfrecord --images DIR --out DIR --name TFR-x`` converts an
image folder (one sub-folder per identity) into TFace's layout;
``ppfr-records verify --index X.txt [--data-root DIR]`` checks every record of
an index as training reads it and lists the bad ones (exit 1 when any).
A bad input the user can fix (``BadRecordError``, a missing file) is ``ppfr-records: error: ...``, exit 2.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from ppfr_jax.cli import error_exit, run_cli
from ppfr_jax.data.sources import image_folder_to_tface, tface_source

PROG = "ppfr-records"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("to-tfrecord", help="convert an image folder (one folder per identity) to TFace records")
    c.add_argument("--images", required=True)
    c.add_argument("--out", required=True, help="output root (gets <name>.txt and <name>/)")
    c.add_argument("--name", required=True, help="dataset name, e.g. TFR-mydata")
    c.add_argument("--landmarks", default=None, help="npz with paths (relative to --images) and landmarks (M,K,2)")
    c.add_argument("--shard-size", type=int, default=500_000)
    c.add_argument("--skip-bad", action="store_true")
    v = sub.add_parser("verify", help="check every record of a TFace index as training reads it (index line, "
                                      "framing and data CRC32C, Example fields, image decode, landmarks)")
    v.add_argument("--index", required=True)
    v.add_argument("--data-root", default=None)
    return p


def _main(argv: Sequence[str] | None) -> int:
    a = _parser().parse_args(argv)
    try:
        return _run(a)
    except OSError as e:  # a folder or index that is not there (or not readable): the user's to fix
        return error_exit(PROG, e)


def _run(a: argparse.Namespace) -> int:
    if a.cmd == "to-tfrecord":
        out = image_folder_to_tface(a.images, a.out, a.name, landmarks=a.landmarks,
                                    shard_size=a.shard_size, skip_bad=a.skip_bad)
        print(f"wrote {out['count']} records to {out['dir']}, index {out['index']} "
              f"(skipped {out['skipped']})")
        return 0
    src = tface_source(a.index, a.data_root, skip_bad=True, check_headers=True)
    bad = [m for m in (src.check(i) for i in range(len(src))) if m is not None]
    for m in src.problems + bad:
        print(m)
    print(f"{len(src)} records listed, {len(src.problems)} bad index lines, {len(bad)} bad records"
          + (f"; first: {(src.problems + bad)[0]}" if src.problems or bad else ""))
    return 1 if (src.problems or bad) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point: -> exit code (0, 1 = bad records found, 2 = error)."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
