"""DuetFace as a method: its training tasks, the frozen client and PFLD, the ROI, and its client/server split.

Tasks (``tasks.register``): ``duetface_client`` (stage 1, "warm-up": the client
backbone alone on the 30 low-frequency DCT channels) and ``duetface`` (stage 2:
server IR net + interactive blocks, the stage-1 client frozen, read from
``config.duetface.client_workdir`` by ``checkpoints.load_frozen``; without one,
``ClientCheckpointNotFound`` names the field and the command that makes it).

Facial ROI (``config.duetface.roi_source``): ``'dataset'`` (batch key
``landmarks`` (B, 98, 2) normalised, x = column), ``'pfld'`` (a frozen PFLD,
weights from ``config.duetface.pfld_checkpoint``) or ``'template'`` (a constant
hull for aligned faces); a batch's own ``roi`` (B, 112, 112, 1) in [0, 1]
replaces it (the training-parity run).

Client/server split (``DuetFaceSplit``, the contract of ``ppfr_jax.methods``):
the client sends the 162 server DCT channels and 4 attention masks
(``server_channels``, ``attention_mask_0..3``), never the 30 low-frequency
channels, the image or the ROI; the server needs only ``server_model``.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ppfr_jax import checkpoints, frequency, roi, tasks
from ppfr_jax.errors import PpfrError
from ppfr_jax.methods.contract import take
from ppfr_jax.models import pfld
from ppfr_jax.models.duetface import DuetFaceModel, build_client
from ppfr_jax.torch_pickle import find_state_dict, load_torch_file
from ppfr_jax.models import duetface as duetface_model

IMAGE_SIZE = frequency.IMAGE_SIZE
ROI_SOURCES = ("dataset", "pfld", "template")


def build_model(backbone: str = "ir18", client_backbone: str = "mobilefacenet", *, embedding_size: int = 512,
                client_embedding_size: int = 512, dropout: float = 0.4, sub_channels=frequency.SUB_CHS,
                dtype=jnp.float32) -> DuetFaceModel:
    """DuetFace with the IR ``backbone`` (a ``tasks.build_backbone`` name) on the server channels.

    Raises:
      ValueError naming ``config.model.backbone`` when it is not an IR net, or the unknown client.
    """
    if not backbone.startswith("ir"):
        raise ValueError(f"config.model.backbone: DuetFace's server must be an IR network, got {backbone!r}")
    server = tasks.build_backbone(backbone, embedding_size, dropout, dtype)
    return duetface_model.build_model(server, client_backbone, client_embedding_size=client_embedding_size,
                                      sub_channels=sub_channels, dtype=dtype)


def split_input(images, sub_channels=frequency.SUB_CHS, dtype=jnp.float32):
    """uint8 / [-1, 1] RGB (N, 112, 112, 3) -> (server (N,112,112,162), client (N,112,112,30)) DCT channels."""
    x = tasks.normalize_images(images)
    server, client = frequency.split_channels(frequency.dct_transform(x), sub_channels)
    # materialised once: without the barrier XLA:CPU fuses the DCT into each of its consumers
    # (the input conv and its weight gradient) and computes it twice per training step
    return jax.lax.optimization_barrier((server.astype(dtype), client.astype(dtype)))


def sub_channels_of(config) -> tuple[int, ...]:
    """``config.duetface.sub_channels`` as ints (the paper's ``frequency.SUB_CHS`` when unset)."""
    d = config.get("duetface", None)
    return tuple(int(c) for c in d.get("sub_channels", frequency.SUB_CHS)) if d is not None else frequency.SUB_CHS


# ----------------------------------------------------------------------------- checkpoints


class ClientCheckpointNotFound(PpfrError, FileNotFoundError):
    """DuetFace server training was asked to start without a trained client."""


def load_pfld_variables(path: str) -> dict:
    """PFLD weights: a reference ``.pth`` (state_dict under ``pfld_backbone``, read without torch) or an
    Orbax directory written by ``ppfr-import --model pfld``. -> ``{'params', 'batch_stats'}`` numpy."""
    if not path:
        raise FileNotFoundError("config.duetface.pfld_checkpoint is empty: roi_source='pfld' needs PFLD weights "
                                "(the reference's .pth, or `ppfr-import --model pfld` output)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.duetface.pfld_checkpoint: {path!r} does not exist")
    target = pfld.init_variables(pfld.PFLDInference())
    if os.path.isdir(path):
        import orbax.checkpoint as ocp
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(target))
        with ocp.PyTreeCheckpointer() as ck:
            out = ck.restore(os.path.abspath(path), args=ocp.args.PyTreeRestore(
                item=dict(target), restore_args=restore_args))
        return {"params": out["params"], "batch_stats": out["batch_stats"]}
    obj = load_torch_file(path)
    key = "pfld_backbone" if isinstance(obj, Mapping) and "pfld_backbone" in obj else None
    sd = {k: v for k, v in find_state_dict(obj, key, path=path).items() if isinstance(v, np.ndarray)}
    return pfld.import_torch_state_dict(sd, target, strip_prefix="module.")


# ----------------------------------------------------------------------------- training tasks


@tasks.register("duetface_client")
class DuetFaceClientTask(tasks.RecognitionTask):
    """Stage 1 ("warm-up"): the client backbone alone on the 30 low-frequency channels, with its own head.

    Config: ``duetface.client_backbone`` (``'mobilefacenet'`` / ``'mobilefacenet_tiny'``),
    ``model.embedding_size``, ``head.*``. Variables as ``RecognitionTask``
    (``params/backbone`` is the client), which is what stage 2 loads.
    """

    def __init__(self, config, num_classes: int, padded_classes: int | None = None):
        super().__init__(config, num_classes, padded_classes)
        self.sub_channels = sub_channels_of(config)
        self.backbone = build_client(config.duetface.client_backbone, 3 * len(self.sub_channels),
                                     config.model.embedding_size, self.dtype)

    def model_input(self, images, rng=None):
        return split_input(images, self.sub_channels, self.dtype)[1]


@tasks.register("duetface")
class DuetFaceTask(tasks.RecognitionTask):
    """Stage 2: server + interactive blocks + head, with the stage-1 client (and PFLD) frozen.

    Variables: ``params = {'duetface': {server_model, attention_0..3}, 'head'}``,
    ``batch_stats = {'duetface': {server_model}}``, and the frozen parts as
    constants outside the optimised params: ``frozen = {'client_model':
    {params, batch_stats}[, 'pfld': {params, batch_stats}]}``. The optimiser
    never sees the client, so it cannot change (no gradient, no weight decay,
    no BatchNorm statistics update: the client runs in inference mode).

    Config ``duetface``: ``client_workdir`` (the stage-1 run; required),
    ``client_step`` (0 = latest), ``client_backbone``,
    ``client_embedding_size``, ``roi_source`` / ``eval_roi_source``,
    ``pfld_checkpoint``, ``sub_channels``, ``client_command`` (printed when the
    client checkpoint is missing).
    """

    def __init__(self, config, num_classes: int, padded_classes: int | None = None):
        super().__init__(config, num_classes, padded_classes)  # the margin head
        d = config.duetface
        m = config.model
        self.sub_channels = sub_channels_of(config)
        self.model = build_model(m.backbone, d.client_backbone, embedding_size=m.embedding_size,
                                 client_embedding_size=d.client_embedding_size, dropout=m.get("dropout", 0.4),
                                 sub_channels=self.sub_channels, dtype=self.dtype)
        self.split = DuetFaceSplit(self.model, self.sub_channels)
        self.roi_source = d.roi_source
        self.eval_roi_source = d.get("eval_roi_source", "") or (
            "template" if self.roi_source == "dataset" else self.roi_source)
        for field, src in (("roi_source", self.roi_source), ("eval_roi_source", self.eval_roi_source)):
            if src not in ROI_SOURCES:
                raise ValueError(f"config.duetface.{field}: unknown ROI source {src!r}; choose one of {ROI_SOURCES}")
        if self.eval_roi_source == "dataset":
            raise ValueError("config.duetface.eval_roi_source: verification batches carry no landmarks; "
                             "use 'template' or 'pfld'")
        self.frozen = {"client_model": self._load_client(config)}
        if "pfld" in (self.roi_source, self.eval_roi_source):
            self.pfld = pfld.PFLDInference()
            self.frozen["pfld"] = load_pfld_variables(d.get("pfld_checkpoint", ""))

    # -- set-up --------------------------------------------------------------------------------
    def _load_client(self, config) -> dict:
        """The warm-up run's client ``{'params', 'batch_stats'}`` (numpy), shape-checked against this config."""
        d = config.duetface
        x = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3 * len(self.sub_channels)), jnp.float32)
        want = jax.eval_shape(functools.partial(self.model.client_model.init, train=False), jax.random.key(0), x)
        wd = d.get("client_workdir", "") or ""
        client, step = checkpoints.load_frozen(
            wd, {"params": ("params", "backbone"), "batch_stats": ("batch_stats", "backbone")},
            field="config.duetface.client_workdir",
            what="DuetFace server training freezes the client of a finished warm-up run (task 'duetface_client')",
            how_to_make=d.get("client_command", "") or (
                "python -m ppfr_jax.main --config configs/duetface.py:client --workdir runs/duetface_client"),
            want={"params": want["params"], "batch_stats": want.get("batch_stats", {})},
            mismatch_hint=(f"config.duetface.client_backbone={d.client_backbone!r} / client_embedding_size="
                           f"{d.client_embedding_size} must be the warm-up run's settings"),
            step=int(d.get("client_step", 0) or 0) or None, not_found=ClientCheckpointNotFound)
        if jax.process_index() == 0:
            print(f"DuetFace: frozen client from {os.path.abspath(wd)} (step {step})", flush=True)
        return client

    # -- pieces --------------------------------------------------------------------------------
    @staticmethod
    def _model_variables(params, model_state) -> dict:
        """Our parameters + the frozen client -> variables of ``DuetFaceModel``."""
        client = jax.tree.map(jax.lax.stop_gradient, model_state["frozen"]["client_model"])
        p = {**params["duetface"], "client_model": client["params"]}
        bs = {**model_state["batch_stats"]["duetface"], "client_model": client["batch_stats"]}
        return {"params": p, "batch_stats": bs}

    def roi_mask(self, model_state, x, landmarks=None, source: str | None = None):
        """(B, 112, 112) ROI of normalised RGB ``x`` (B, 112, 112, 3) in [-1, 1]."""
        source = source or self.roi_source
        b = x.shape[0]
        if source == "template":
            return jnp.broadcast_to(jnp.asarray(roi.template_mask()), (b, 112, 112))
        if source == "pfld":
            v = jax.tree.map(jax.lax.stop_gradient, model_state["frozen"]["pfld"])
            _, lm = self.pfld.apply(v, x * 0.5 + 0.5, train=False)  # PFLD takes [0, 1]
            landmarks = lm.reshape(b, -1, 2)
        elif landmarks is None:
            raise ValueError("config.duetface.roi_source='dataset' but the batch has no 'landmarks' "
                             "(set config.data.landmarks=True with a source that carries them, or use "
                             "roi_source='template' / 'pfld')")
        return roi.landmark_mask(jax.lax.stop_gradient(jnp.asarray(landmarks, jnp.float32)))

    # -- task interface --------------------------------------------------------------------------
    def init(self, rng, images, labels):
        r_m, r_h = jax.random.split(rng)
        x = tasks.normalize_images(images)
        x_server, x_client = split_input(x, self.sub_channels, self.dtype)
        r = jnp.broadcast_to(jnp.asarray(roi.template_mask()), (x.shape[0], 112, 112))
        v = self.model.init({"params": r_m, "dropout": r_m}, x_server, x_client, r, train=False)
        params = {k: p for k, p in v["params"].items() if k != "client_model"}
        stats = {k: s for k, s in v["batch_stats"].items() if k != "client_model"}
        frozen = jax.tree.map(jnp.asarray, self.frozen)
        model_state = {"batch_stats": {"duetface": stats}, "frozen": frozen}
        emb = self.model.apply(self._model_variables({"duetface": params}, model_state), x_server, x_client, r)
        hd = self.head.init({"params": r_h, "sample": r_h}, emb, labels)
        variables = {"params": {"duetface": params, "head": hd["params"]}, **model_state}
        if "head_state" in hd:
            variables["head_state"] = {"head": hd["head_state"]}
        return variables

    def features(self, params, model_state, images, rng, train, landmarks=None, given_roi=None):
        """``RecognitionTask.features``; ``given_roi`` (B, 112, 112[, 1]) in [0, 1] is the ROI itself
        (used instead of ``roi_source``'s, which is then not computed)."""
        x = tasks.normalize_images(images)
        x_server, x_client = split_input(x, self.sub_channels, self.dtype)
        if given_roi is None:
            r = self.roi_mask(model_state, x, landmarks)
        else:
            r = jnp.asarray(given_roi, jnp.float32)
            r = jax.lax.stop_gradient(r[..., 0] if r.ndim == 4 else r)
        v = self._model_variables(params, model_state)
        emb, upd = self.model.apply(v, x_server, x_client, r, train=train, rngs={"dropout": rng},
                                    mutable=["batch_stats"])
        stats = {k: s for k, s in upd["batch_stats"].items() if k != "client_model"}
        new_state = {**model_state, "batch_stats": {**model_state["batch_stats"], "duetface": stats}}
        return emb, new_state

    def batch_features(self, params, model_state, batch, rng, train):
        """A batch field ``roi`` (B, 112, 112, 1) in [0, 1], when present, is the facial ROI used instead of
        ``roi_source``'s (as MinusFace stage 2 reads recorded shuffles from ``batch['perms']``: the
        training-parity run, ``bench/train_parity.py``, feeds the reference's ``landmark_inference`` mask
        this way). Without it: ``roi_source`` (``landmarks`` for ``'dataset'``)."""
        return self.features(params, model_state, batch["image"], rng, train, batch.get("landmarks"),
                             batch.get("roi"))

    def embed(self, variables, images):
        x = tasks.normalize_images(images)
        x_server, x_client = split_input(x, self.sub_channels, self.dtype)
        r = self.roi_mask(variables, x, None, self.eval_roi_source)
        return self.model.apply(self._model_variables(variables["params"], variables), x_server, x_client, r,
                                train=False)


# ----------------------------------------------------------------------------- client/server contract


class DuetFaceSplit:
    """DuetFace's client/server contract (see ``ppfr_jax.methods``).

    Client input ``extra``: the facial ROI (B, 112, 112) float32 in {0, 1}.
    Transmitted: ``server_channels`` (B, 112, 112, 162) and
    ``attention_mask_<s>`` (B, 56/28/14/7, same, 1) in [0, 1]. Engine variables:
    ``params/duetface`` ({server_model, attention_0..3}), ``batch_stats/duetface``,
    ``frozen/client_model`` ({params, batch_stats}).
    """

    method = "duetface"
    tasks = ("duetface",)
    input_names = ("images", "roi_mask")
    output_names = ("server_channels",) + tuple(f"attention_mask_{s}" for s in range(duetface_model.NUM_STAGES))

    def __init__(self, model: DuetFaceModel, sub_channels=frequency.SUB_CHS):
        self.model = model
        self.sub_channels = tuple(int(c) for c in sub_channels)

    @classmethod
    def from_config(cls, config) -> "DuetFaceSplit":
        """The split of a run with this config (float32, no dropout at inference)."""
        d, m = config.duetface, config.model
        sub = sub_channels_of(config)
        return cls(build_model(m.backbone, d.client_backbone, embedding_size=m.embedding_size,
                               client_embedding_size=d.client_embedding_size, dropout=m.get("dropout", 0.4),
                               sub_channels=sub), sub)

    def describe(self) -> dict[str, str]:
        """What a deployed client records about itself (ONNX metadata)."""
        return {"ppfr.sub_channels": "[" + ", ".join(str(c) for c in self.sub_channels) + "]"}

    def input_specs(self, batch: int | str = "B") -> list[jax.ShapeDtypeStruct]:
        """images (B, 112, 112, 3) float32 in [-1, 1]; roi_mask (B, 112, 112) float32 in {0, 1}."""
        return [jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32),
                jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE), jnp.float32)]

    def init_variables(self, key) -> dict:
        """Untrained variables in the engine's layout (no head), from ``key``."""
        n_client = 3 * len(self.sub_channels)
        shapes = [(1, IMAGE_SIZE, IMAGE_SIZE, frequency.NUM_CHANNELS - n_client),
                  (1, IMAGE_SIZE, IMAGE_SIZE, n_client), (1, IMAGE_SIZE, IMAGE_SIZE)]
        v = self.model.init({"params": key, "dropout": key}, *[jnp.zeros(s) for s in shapes])
        drop = lambda t: {k: x for k, x in t.items() if k != "client_model"}  # noqa: E731
        return {"params": {"duetface": drop(v["params"])}, "batch_stats": {"duetface": drop(v["batch_stats"])},
                "frozen": {"client_model": {"params": v["params"]["client_model"],
                                            "batch_stats": v["batch_stats"]["client_model"]}}}

    def client_variables(self, variables) -> dict:
        """Engine variables -> the client half: ``client_model`` (params, batch_stats) + ``attention_*``."""
        p, client = take(variables, "params/duetface"), take(variables, "frozen/client_model")
        attention = {k: v for k, v in p.items() if k.startswith("attention_")}
        return {"params": {"client_model": take(client, "params"), **attention},
                "batch_stats": {"client_model": client.get("batch_stats", {})}}

    def server_variables(self, variables) -> dict:
        """Engine variables -> the server half: ``server_model`` (params, batch_stats)."""
        return {"params": {"server_model": take(variables, "params/duetface/server_model")},
                "batch_stats": {"server_model": take(variables, "batch_stats/duetface/server_model")}}

    def split_variables(self, variables) -> tuple[dict, dict]:
        """Engine variables -> ``(client_variables, server_variables)``.

        Raises ``contract.MissingVariables`` naming the first missing sub-tree.
        """
        return self.client_variables(variables), self.server_variables(variables)

    def client_fn(self, client_vars, images, extra) -> dict:
        """images (B, 112, 112, 3) uint8 / float [-1, 1] + ROI (B, 112, 112) -> {output name: (B, ...)}."""
        x_server, x_client = split_input(images, self.sub_channels)
        masks = self.model.apply(client_vars, x_client, jnp.asarray(extra, jnp.float32),
                                 method=DuetFaceModel.client_side)
        return {"server_channels": x_server, **{f"attention_mask_{s}": m for s, m in enumerate(masks)}}

    def server_fn(self, server_vars, transmitted: Mapping[str, Any]) -> jax.Array:
        """{output name: (B, ...)} -> embeddings (B, E) (not normalised); reads only ``server_model``."""
        masks = tuple(transmitted[f"attention_mask_{s}"] for s in range(duetface_model.NUM_STAGES))
        return self.model.apply(server_vars, transmitted["server_channels"], masks,
                                method=DuetFaceModel.server_side)
