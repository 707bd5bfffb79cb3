"""Protected files: what ``ppfr-protect`` writes and ``ppfr-verify`` reads, one ``.npz`` per image.

A file holds only the transmitted tensors of one sample (no batch axis; the
method's ``output_names``, float32) and ``meta``, a JSON string: ``format``,
``version``, ``method``, ``task``, ``step``, ``client_fingerprint`` (hash of the
client's weights, so a server refuses tensors made by another client),
``tensors`` (name -> shape), ``backend``. Never the image, its name, the ROI or
the permutation.

A client's file is untrusted: :func:`load_protected` decompresses at most
:data:`MAX_PROTECTED_BYTES` (``safe_npz`` checks the headers first) and raises
``DeployError`` naming the file for anything else than what a matching client
writes (missing, not an .npz, wrong format / version / method / client,
wrong shape or dtype, non-finite values).
"""
from __future__ import annotations

import json
import os
import zipfile
from typing import Mapping

import numpy as np

from ppfr_jax import safe_npz
from ppfr_jax.deploy.deployment import DeployError, Deployment

FILE_FORMAT = "ppfr-protected"
FILE_VERSION = 1
# The largest protected file a client writes: DuetFace's 162 channels, 112x112 float32 (8.1 MB) + masks.
MAX_PROTECTED_BYTES = 64 << 20


def save_protected(path, deployment: Deployment, tensors: Mapping[str, np.ndarray],
                   backend: str = "jax") -> None:
    """Write one protected sample: ``tensors`` {name: per-sample array (no batch axis)} + ``meta``.

    ``path``: a file name (``.npz`` is appended if missing) or a binary file object.
    """
    want = deployment.tensor_shapes
    if set(tensors) != set(want):
        raise DeployError(f"{path}: tensors {sorted(tensors)} are not the client's outputs {sorted(want)}")
    meta = {"format": FILE_FORMAT, "version": FILE_VERSION, "method": deployment.method, "task": deployment.task,
            "step": deployment.step, "client_fingerprint": deployment.client_fingerprint, "backend": backend,
            "tensors": {k: list(np.shape(v)) for k, v in tensors.items()}}
    arrays = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    np.savez_compressed(path, meta=np.asarray(json.dumps(meta)), **arrays)


def load_protected(path: str | os.PathLike, deployment: Deployment | None = None) -> tuple[dict, dict]:
    """Read a protected file -> (tensors {name: array}, meta); checked against ``deployment`` if given.

    At most :data:`MAX_PROTECTED_BYTES` are decompressed (``safe_npz``: checked
    on the headers first), so a hostile file cannot make the server allocate more.

    Raises:
      DeployError naming the file: missing, not an .npz, not a protected file,
      over the size limit, another method, another client, or tensors of the
      wrong shape / dtype / non-finite values.
    """
    p = str(path)
    if not os.path.isfile(p):
        raise DeployError(f"{p}: no such file")
    if not zipfile.is_zipfile(p):  # np.load would try it as a pickle and say so, confusingly
        raise DeployError(f"{p}: not an .npz file (not a zip archive); expected a file written by ppfr-protect")
    # a client's file is untrusted: headers and sizes checked before anything is decompressed
    data = safe_npz.load_npz(p, max_bytes=MAX_PROTECTED_BYTES, error=DeployError)
    if "meta" not in data:
        raise DeployError(f"{p}: not a protected file (no 'meta' entry; write it with ppfr-protect)")
    m = data.pop("meta")
    if m.ndim != 0 or m.dtype.kind != "U":
        raise DeployError(f"{p}: not a protected file ('meta' is not a JSON string)")
    try:
        meta = json.loads(str(m))
    except json.JSONDecodeError as e:
        raise DeployError(f"{p}: corrupt 'meta' ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT:
        raise DeployError(f"{p}: not a protected file (meta.format is not {FILE_FORMAT!r})")
    if meta.get("version") != FILE_VERSION:
        raise DeployError(f"{p}: protected-file version {meta.get('version')!r}; this ppfr_jax reads {FILE_VERSION}")
    if deployment is not None:
        if meta.get("method") != deployment.method:
            raise DeployError(f"{p}: made by method {meta.get('method')!r}, but this run is {deployment.method} "
                              f"({deployment.source})")
        if meta.get("client_fingerprint") != deployment.client_fingerprint:
            raise DeployError(f"{p}: made by a different client (fingerprint {meta.get('client_fingerprint')}) "
                              f"than this run's ({deployment.client_fingerprint}, {deployment.source}); the server "
                              f"only understands its own client's output")
        for name, shape in deployment.tensor_shapes.items():
            if name not in data:
                raise DeployError(f"{p}: no tensor {name!r} (has {sorted(data)})")
            if tuple(data[name].shape) != shape:
                raise DeployError(f"{p}: tensor {name!r} has shape {data[name].shape}, expected {shape}")
            if data[name].dtype != np.float32:
                raise DeployError(f"{p}: tensor {name!r} is {data[name].dtype}, expected float32")
            if not np.isfinite(data[name]).all():
                raise DeployError(f"{p}: tensor {name!r} has non-finite values")
    return data, meta


def preview_image(x_p: np.ndarray) -> np.ndarray:
    """MinusFace X_p (112, 112, 3 * n) in [0, 1] -> uint8 (112, 112 * n, 3): the shuffles side by side."""
    groups = np.split(np.clip(np.asarray(x_p), 0.0, 1.0), x_p.shape[-1] // 3, axis=-1)
    return np.round(np.concatenate(groups, axis=1) * 255.0).astype(np.uint8)
