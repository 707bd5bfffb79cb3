"""ONNX export of a run's client half (DuetFace ``client_side``, MinusFace ``protect``), and ``ppfr-export``.

The exported graph is :meth:`ppfr_jax.deploy.Deployment.client_fn` with the
client's weights baked in, converted by jax2onnx with a symbolic batch
dimension ``B``:

=========  =======================================  ==========================================
method     inputs                                   outputs
=========  =======================================  ==========================================
duetface   ``images`` (B, 112, 112, 3) float32,     ``server_channels`` (B, 112, 112, 162),
           ``roi_mask`` (B, 112, 112) float32       ``attention_mask_0..3`` (B, 56/28/14/7, same, 1)
minusface  ``images`` (B, 112, 112, 3) float32,     ``x_p`` (B, 112, 112, 3 * n_duplicate) in [0, 1]
           ``permutations`` (B, n_duplicate, 192)
           int32
=========  =======================================  ==========================================

``images`` are aligned RGB faces, NHWC, scaled to [-1, 1] (``uint8 / 127.5 - 1``).

Randomness (MinusFace): ONNX has no counter-based RNG to match
``jax.random``, and a seed baked into the graph would give every call the same
shuffle. So the graph takes the permutations as an input and the host draws
them fresh for every image from the OS's entropy
(:func:`ppfr_jax.deploy.fresh_permutations`, ``random.SystemRandom``). The
graph itself is deterministic: the same image and permutations give the same
``x_p`` in JAX and ONNX, which is what makes the export checkable. The graph
does not check that the rows are permutations (``check_permutations`` does,
on the host); the permutation is the client's secret and must not be sent.

DuetFace ROI: the convex-hull rasteriser (``ppfr_jax.roi``) is exact integer
arithmetic over a data-dependent hull, so the mask is a graph input rather
than part of the graph: ``roi.template_mask()`` for aligned faces (what the
run verifies with when ``eval_roi_source='template'``), or the hull of a
landmark detector's output.

Check (:func:`compare`): onnxruntime's outputs vs the JAX client on random
faces at two batch sizes (so the symbolic batch is exercised), required
``max |onnx - jax| <= TOLERANCE * max(1, max |jax|)`` per output. Both are
float32 programs that sum in different orders; DCT coefficients reach ~1e3
and pass through a few dozen layers, so a few float32 ulps of the output's
scale (1.2e-7 each) are expected; measured on the tiny models: 2e-7 x scale for
DuetFace's channels, 2.5e-6 on MinusFace's X_p in [0, 1]. ``TOLERANCE =
1e-4`` leaves room for deeper, trained networks while still failing on any
real difference (a wrong channel, layout or weight is O(scale)).

Command line::

    ppfr-export --workdir runs/minusface_stage2_demo --out client.onnx
    ppfr-export --method duetface --config configs/duetface.py:server,tiny --untrained --out /tmp/c.onnx

Needs the ``export`` extra (jax2onnx, onnxruntime).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

import jax
import numpy as np

from ppfr_jax import deploy
from ppfr_jax.errors import PpfrError

TOLERANCE = 1e-4
_INSTALL_HINT = "ONNX export needs jax2onnx, onnx and onnxruntime: pip install 'ppfr_jax[export]'"


def _require(*modules: str):
    import importlib
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e


def metadata(dep: deploy.Deployment) -> dict[str, str]:
    """What the ONNX file records about its client (``metadata_props``)."""
    meta = {"ppfr.method": dep.method, "ppfr.task": dep.task, "ppfr.client_fingerprint": dep.client_fingerprint,
            "ppfr.step": "" if dep.step is None else str(dep.step), "ppfr.source": dep.source,
            "ppfr.inputs": json.dumps({n: [str(d) for d in s.shape] + [str(s.dtype)]
                                       for n, s in zip(dep.input_names, dep.input_specs())}),
            "ppfr.images": "aligned RGB faces, NHWC, float32 in [-1, 1] (uint8 / 127.5 - 1)"}
    if dep.method == "duetface":
        meta["ppfr.roi_source"] = dep.roi_source
        meta["ppfr.sub_channels"] = json.dumps(list(dep.sub_channels))
    else:
        meta["ppfr.n_duplicate"] = str(dep.n_duplicate)
        meta["ppfr.permutations"] = "fresh per image from OS entropy (ppfr_jax.deploy.fresh_permutations)"
    return meta


def client_onnx(dep: deploy.Deployment, *, opset: int | None = None):
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
    model.doc_string = (f"ppfr_jax {dep.method} client ({dep.task}, {dep.source}); see ppfr_jax/export.py for the "
                        f"inputs and outputs")
    return model


class OnnxClient:
    """An exported client run with onnxruntime (CPU): ``run(images, extra) -> {name: (B, ...)}``.

    ``expect``: a Deployment the file must belong to (same method and client
    fingerprint), so a stale export cannot silently feed another run's server.
    """

    def __init__(self, path: str, expect: deploy.Deployment | None = None):
        (ort,) = _require("onnxruntime")
        if not os.path.isfile(path):
            raise deploy.DeployError(f"{path}: no such ONNX file")
        try:
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own exception types)
            raise deploy.DeployError(f"{path}: not a loadable ONNX model ({type(e).__name__}: {e})") from None
        self.path = path
        self.meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        if expect is not None:
            for key, want in (("ppfr.method", expect.method), ("ppfr.client_fingerprint", expect.client_fingerprint)):
                if self.meta.get(key) != want:
                    raise deploy.DeployError(f"{path}: {key}={self.meta.get(key)!r} but the run ({expect.source}) "
                                             f"has {want!r}; export this run's client with ppfr-export")

    def run(self, images: np.ndarray, extra: np.ndarray) -> dict[str, np.ndarray]:
        images = deploy._normalise(deploy._check_images(images))
        extra = np.asarray(extra, np.int32 if self.meta.get("ppfr.method") == "minusface" else np.float32)
        outs = self.session.run(None, dict(zip(self.input_names, (images, extra))))
        return dict(zip(self.output_names, outs))


def compare(dep: deploy.Deployment, client: OnnxClient, batch_sizes: Sequence[int] = (1, 3),
            rng: np.random.Generator | None = None) -> dict[str, dict[str, float]]:
    """Max |onnx - jax| per output over random faces at each batch size.

    -> ``{f'{name}@{b}': {'max_abs_diff', 'scale', 'tolerance'}}`` with
    ``tolerance = TOLERANCE * max(1, scale)``, scale = max |jax output|.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    report = {}
    for b in batch_sizes:
        images = rng.uniform(-1.0, 1.0, (b, deploy.IMAGE_SIZE, deploy.IMAGE_SIZE, 3)).astype(np.float32)
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


def export_client(dep: deploy.Deployment, path: str, *, check: bool = True, batch_sizes: Sequence[int] = (1, 3),
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


def main(argv: list[str] | None = None) -> int:
    """``ppfr-export``: a run's client half -> ONNX (dynamic batch), checked against JAX with onnxruntime."""
    p = argparse.ArgumentParser(prog="ppfr-export", description=main.__doc__)
    p.add_argument("--method", choices=deploy.METHODS, default=None, help="check that the run is of this method")
    deploy._add_run_args(p)
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: jax2onnx's)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-JAX check")
    a = p.parse_args(argv)
    try:
        dep = deploy._deployment_from_args(a, a.method)
        report = export_client(dep, a.out, check=not a.no_check, opset=a.opset)
    except (deploy.DeployError, ImportError) as e:
        print(f"ppfr-export: error: {e}", file=sys.stderr)
        return 2
    except ExportMismatchError as e:
        print(f"ppfr-export: error: {e}", file=sys.stderr)
        return 1
    print(f"ppfr-export: wrote {a.out} ({dep.method} client of {dep.source}; inputs {report['inputs']}, outputs "
          f"{report['outputs']}, batch dimension 'B')")
    for k, v in (report["check"] or {}).items():
        print(f"  {k}: max |onnx - jax| = {v['max_abs_diff']:.3g} (scale {v['scale']:.3g}, "
              f"tolerance {v['tolerance']:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
