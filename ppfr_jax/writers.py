"""Metric writers: clu's default writer (TensorBoard) where it imports, else :class:`JsonlMetricWriter`.

``clu.metric_writers`` imports TensorFlow's summary writer; a host without TensorFlow (the GPU image
with jax alone) writes ``metrics.jsonl`` / ``hparams.json`` / ``images/`` instead. Used by the engine
(``train.py``) and ``privacy.suite``.
"""
from __future__ import annotations

import json

import numpy as np

from ppfr_jax.checkpoints import workdir_path


class JsonlMetricWriter:
    """The engine's metric writer where clu's cannot be imported (``clu.metric_writers`` imports
    TensorFlow's summary writer): ``<workdir>/metrics.jsonl``, one ``{"step": s, name: value, ...}``
    line per ``write_scalars`` call, and ``hparams.json``. Only for hosts without TensorFlow (e.g. a
    GPU image with jax alone); TensorBoard event files need TensorFlow."""

    def __init__(self, workdir: str, just_logging: bool = False):
        self.path = None if just_logging else workdir_path(workdir) / "metrics.jsonl"

    def write_hparams(self, hparams: dict) -> None:
        if self.path is not None:
            (self.path.parent / "hparams.json").write_text(json.dumps(hparams, indent=1, default=str))

    def write_scalars(self, step: int, scalars: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def write_images(self, step: int, images: dict) -> None:
        """Each ``name: (N, H, W, C)`` uint8 batch (C 1 or 3) -> ``images/<name>_step<step>_<i>.png``
        (``/`` in a name becomes ``_``)."""
        if self.path is None:
            return
        from PIL import Image
        out = self.path.parent / "images"
        out.mkdir(exist_ok=True)
        for name, batch in images.items():
            for i, im in enumerate(np.asarray(batch)):
                im = im[..., 0] if im.ndim == 3 and im.shape[-1] == 1 else im
                Image.fromarray(np.asarray(im, np.uint8)).save(
                    out / f"{name.replace('/', '_')}_step{int(step)}_{i}.png")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def metric_writer(workdir: str, *, just_logging: bool = False, asynchronous: bool = True, log=print):
    """clu's default writer (TensorBoard event files + log) for ``workdir``; where ``clu.metric_writers``
    cannot be imported (it needs TensorFlow), a :class:`JsonlMetricWriter` there, said through ``log``."""
    try:
        from clu import metric_writers
    except ImportError as e:
        log(f"note: TensorBoard summaries need TensorFlow (clu.metric_writers: {e}); writing "
            f"{workdir_path(workdir) / 'metrics.jsonl'} instead")
        return JsonlMetricWriter(workdir, just_logging)
    return metric_writers.create_default_writer(workdir, just_logging=just_logging,
                                                asynchronous=asynchronous)
