"""The deployed client/server split of a trained run (``ppfr-protect`` runs the client, ``ppfr-verify`` the server).

- ``deployment.py``: :func:`load_deployment` -> :class:`Deployment` (the
  method's contract from ``ppfr_jax.methods`` applied to a run's variables;
  the client's ROI / fresh permutations drawn on the host);
- ``protected_file.py``: the ``.npz`` a client sends (transmitted tensors +
  ``meta``; never the image, its name, the ROI or the permutation);
- ``onnx.py``: the client half as ONNX (``ppfr-export``), checked against JAX.

Every unusable input raises :class:`DeployError` (a ``PpfrError`` and a
``ValueError``) naming it. The command lines live in ``ppfr_jax/cli/``.
"""
from ppfr_jax.deploy.deployment import (IMAGE_SIZE, METHOD_NAMES, DeployError, Deployment, cached_deployment,
                                        check_permutations, fingerprint, fresh_permutations, load_deployment)
from ppfr_jax.deploy.protected_file import MAX_PROTECTED_BYTES, load_protected, preview_image, save_protected

__all__ = ["IMAGE_SIZE", "MAX_PROTECTED_BYTES", "METHOD_NAMES", "DeployError", "Deployment", "cached_deployment",
           "check_permutations", "fingerprint", "fresh_permutations", "load_deployment", "load_protected",
           "preview_image", "save_protected"]
