"""ONNX export of a run's client half (``ppfr-export``), run with onnxruntime and checked against JAX.

The graph is ``Deployment.client_fn`` (the method's ``client_fn``, see
``ppfr_jax.methods``) with the client's weights as constants and a symbolic
batch ``B``; its inputs and outputs are the method's ``input_names`` /
``output_names``: ``images`` (B, 112, 112, 3) float32 in [-1, 1] plus
DuetFace's ``roi_mask`` (B, 112, 112) float32 -> ``server_channels``,
``attention_mask_0..3``; or MinusFace's ``permutations`` (B, n_duplicate, 192)
int32 -> ``x_p`` (B, 112, 112, 3 * n_duplicate) in [0, 1]. The second input is
drawn on the host (the ROI rasteriser is data-dependent integer arithmetic;
ONNX has no RNG matching ``jax.random`` and a baked seed would repeat the
shuffle), so the graph is deterministic and checkable. The file's metadata
names its run and client fingerprint; :class:`OnnxClient` refuses another run's.

Check (:func:`compare`): ``max |onnx - jax| <= TOLERANCE * max(1, max |jax|)``
per output at two batch sizes; both are float32 programs summing in different
orders, and a real difference (wrong channel, layout, weight) is O(scale).
Raises ``DeployError`` (bad file or run) and :class:`ExportMismatchError`.
Needs the ``export`` extra (jax2onnx, onnx, onnxruntime).
"""
from __future__ import annotations

import importlib
import json
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np

from ppfr_jax.deploy.deployment import IMAGE_SIZE, DeployError, Deployment, check_images, normalize_images
from ppfr_jax.errors import PpfrError

TOLERANCE = 1e-4
_INSTALL_HINT = "ONNX export needs jax2onnx, onnx and onnxruntime: pip install 'ppfr_jax[export]'"


def _require(*modules: str):
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e


def metadata(dep: Deployment) -> dict[str, str]:
    """What the ONNX file records about its client (``metadata_props``)."""
    meta = {"ppfr.method": dep.method, "ppfr.task": dep.task, "ppfr.client_fingerprint": dep.client_fingerprint,
            "ppfr.step": "" if dep.step is None else str(dep.step), "ppfr.source": dep.source,
            "ppfr.inputs": json.dumps({n: [str(d) for d in s.shape] + [str(s.dtype)]
                                       for n, s in zip(dep.input_names, dep.input_specs())}),
            "ppfr.images": "aligned RGB faces, NHWC, float32 in [-1, 1] (uint8 / 127.5 - 1)"}
    meta.update(dep.describe())
    return meta


def client_onnx(dep: Deployment, *, opset: int | None = None):
    """The client half as an ``onnx.ModelProto`` with a symbolic batch ``B`` (weights are constants)."""
    jax2onnx, onnx = _require("jax2onnx", "onnx")

    def client(images, extra):
        out = dep.client_fn(images, extra)
        return tuple(out[k] for k in dep.output_names)

    kw = {} if opset is None else {"opset": int(opset)}
    ir_log = logging.getLogger("onnx_ir")
    level = ir_log.level
    ir_log.setLevel(logging.ERROR)  # "value type ... is not known" for shape constants: harmless, noisy
    try:
        model = jax2onnx.to_onnx(client, dep.input_specs("B"), input_names=list(dep.input_names),
                                 output_names=list(dep.output_names), model_name=f"ppfr_{dep.method}_client", **kw)
    finally:
        ir_log.setLevel(level)
    onnx.helper.set_model_props(model, metadata(dep))
    model.doc_string = (f"ppfr_jax {dep.method} client ({dep.task}, {dep.source}); see ppfr_jax/deploy/onnx.py for the "
                        f"inputs and outputs")
    return model


class OnnxClient:
    """An exported client run with onnxruntime (CPU): ``run(images, extra) -> {name: (B, ...)}``.

    ``expect``: a Deployment the file must belong to (same method and client
    fingerprint), so a stale export cannot silently feed another run's server.
    """

    def __init__(self, path: str, expect: Deployment | None = None):
        (ort,) = _require("onnxruntime")
        if not os.path.isfile(path):
            raise DeployError(f"{path}: no such ONNX file")
        try:
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own exception types)
            raise DeployError(f"{path}: not a loadable ONNX model ({type(e).__name__}: {e})") from None
        self.path = path
        self.meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._extra_dtype = np.int32 if "int" in self.session.get_inputs()[1].type else np.float32
        if expect is not None:
            for key, want in (("ppfr.method", expect.method), ("ppfr.client_fingerprint", expect.client_fingerprint)):
                if self.meta.get(key) != want:
                    raise DeployError(f"{path}: {key}={self.meta.get(key)!r} but the run ({expect.source}) "
                                             f"has {want!r}; export this run's client with ppfr-export")

    def run(self, images: np.ndarray, extra: np.ndarray) -> dict[str, np.ndarray]:
        images = normalize_images(check_images(images))
        extra = np.asarray(extra, self._extra_dtype)
        outs = self.session.run(None, dict(zip(self.input_names, (images, extra))))
        return dict(zip(self.output_names, outs))


def compare(dep: Deployment, client: OnnxClient, batch_sizes: Sequence[int] = (1, 3),
            rng: np.random.Generator | None = None) -> dict[str, dict[str, float]]:
    """Max |onnx - jax| per output over random faces at each batch size.

    -> ``{f'{name}@{b}': {'max_abs_diff', 'scale', 'tolerance'}}`` with
    ``tolerance = TOLERANCE * max(1, scale)``, scale = max |jax output|.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    report = {}
    for b in batch_sizes:
        images = rng.uniform(-1.0, 1.0, (b, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
        extra = dep.client_extra(images, rng)
        with jax.default_matmul_precision("float32"):  # no TF32 / bf16 passes in the reference on GPUs
            ref = dep.protect(images, extra)
        got = client.run(images, extra)
        for name in dep.output_names:
            if got[name].shape != ref[name].shape:
                raise AssertionError(f"{client.path}: output {name!r} has shape {got[name].shape} at batch {b}, "
                                     f"JAX gives {ref[name].shape}")
            scale = float(np.abs(ref[name]).max())
            report[f"{name}@{b}"] = {"max_abs_diff": float(np.abs(got[name] - ref[name]).max()), "scale": scale,
                                     "tolerance": TOLERANCE * max(1.0, scale)}
    return report


class ExportMismatchError(PpfrError, AssertionError):
    """The exported client disagrees with the JAX client beyond the float tolerance."""


def export_client(dep: Deployment, path: str, *, check: bool = True, batch_sizes: Sequence[int] = (1, 3),
                  opset: int | None = None) -> dict[str, Any]:
    """Write ``dep``'s client half to ``path`` (ONNX, dynamic batch) and check it against JAX.

    Returns {'path', 'inputs', 'outputs', 'metadata', 'check'} ('check' as :func:`compare`).
    Raises ExportMismatchError (the file stays, for inspection) when a difference exceeds the tolerance.
    """
    (onnx,) = _require("onnx")
    model = client_onnx(dep, opset=opset)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save_model(model, path)
    report = {"path": path, "inputs": list(dep.input_names), "outputs": list(dep.output_names),
              "metadata": metadata(dep), "check": None}
    if check:
        report["check"] = compare(dep, OnnxClient(path, expect=dep), batch_sizes)
        bad = {k: v for k, v in report["check"].items() if not v["max_abs_diff"] <= v["tolerance"]}
        if bad:
            raise ExportMismatchError(f"{path}: ONNX client differs from JAX beyond tolerance: {bad}")
    return report
