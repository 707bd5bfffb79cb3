"""Flags and argument types shared by the deployment commands (``ppfr-protect``, ``ppfr-verify``, ``ppfr-export``).

``add_run_args`` adds ``--workdir`` / ``--config`` / ``--untrained`` / ``--seed`` /
``--step``; ``deployment_from_args`` turns them into a (cached)
``deploy.Deployment`` or raises ``DeployError`` naming the bad combination.
"""
from __future__ import annotations

import argparse

import numpy as np

from ppfr_jax.deploy import DeployError, Deployment, cached_deployment


def _int_at_least(lo: int):
    """argparse type: an integer >= ``lo`` (anything else is one clear line)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v
    return parse


positive_int = _int_at_least(1)
nonneg_int = _int_at_least(0)


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def add_run_args(p: argparse.ArgumentParser):
    p.add_argument("--workdir", default=None, help="a DuetFace server / MinusFace stage-2 training run")
    p.add_argument("--config", default=None,
                   help="configs/<x>.py[:variant]: the run's config (default: the one saved in --workdir); "
                        "with --untrained, the model to initialise")
    p.add_argument("--untrained", action="store_true", help="random weights from --seed (smoke tests only)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="init seed for --untrained")
    p.add_argument("--step", type=nonneg_int, default=None, help="checkpoint step (default: latest)")


def deployment_from_args(a, method=None) -> Deployment:
    if a.workdir and a.untrained:
        raise DeployError("--untrained initialises random weights; it does not go with --workdir")
    if a.untrained and not a.config:
        raise DeployError("--untrained needs --config configs/<x>.py:variant")
    return cached_deployment(a.workdir, a.config, bool(a.untrained), int(a.seed), a.step, method)
