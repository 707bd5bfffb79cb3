"""``ppfr-export``: a run's client half -> ONNX (dynamic batch), checked against JAX with onnxruntime.

Writes ``--out`` with ``deploy.onnx.export_client`` (inputs, outputs and the
check's tolerance: ``ppfr_jax/deploy/onnx.py``) and prints, per output and
batch size, the largest |onnx - jax| difference. Exit status: 0 written and
checked; 2 a bad run, config or a missing ``export`` extra (one line
``ppfr-export: error: ...``); 1 the ONNX client differs from JAX beyond the
tolerance (the file stays, for inspection).

Examples::

    ppfr-export --workdir runs/minusface_stage2_demo --out client.onnx
    ppfr-export --method duetface --config configs/duetface.py:server,tiny --untrained --out /tmp/c.onnx
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ppfr_jax.cli import error_exit, run_cli
from ppfr_jax.cli.deploy_args import add_run_args, deployment_from_args
from ppfr_jax.deploy import METHOD_NAMES
from ppfr_jax.deploy.onnx import ExportMismatchError, export_client

PROG = "ppfr-export"
DESCRIPTION = "``ppfr-export``: a run's client half -> ONNX (dynamic batch), checked against JAX with onnxruntime."


def _export(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    p.add_argument("--method", choices=METHOD_NAMES, default=None, help="check that the run is of this method")
    add_run_args(p)
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: jax2onnx's)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-JAX check")
    a = p.parse_args(argv)
    dep = deployment_from_args(a, a.method)
    try:
        report = export_client(dep, a.out, check=not a.no_check, opset=a.opset)
    except ImportError as e:  # the optional ``export`` extra is missing: the user's to fix
        return error_exit(PROG, e)
    except ExportMismatchError as e:  # a real difference, not a usage error
        return error_exit(PROG, e, code=1)
    print(f"ppfr-export: wrote {a.out} ({dep.method} client of {dep.source}; inputs {report['inputs']}, outputs "
          f"{report['outputs']}, batch dimension 'B')")
    for k, v in (report["check"] or {}).items():
        print(f"  {k}: max |onnx - jax| = {v['max_abs_diff']:.3g} (scale {v['scale']:.3g}, "
              f"tolerance {v['tolerance']:.3g})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, _export, argv)


if __name__ == "__main__":
    sys.exit(main())
