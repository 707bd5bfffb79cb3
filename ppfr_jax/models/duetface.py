"""DuetFace (ACM MM 2022, arXiv 2207.07340): client/server face recognition on split frequency channels.

The face is moved to the block-DCT domain (``ppfr_jax.frequency``) and split:

- the **client** keeps the 30 low-frequency channels (``SUB_CHS`` of each
  colour) and runs a MobileFaceNet on them (``DuetFaceClient``, or
  ``MobileFaceNetTiny`` for tests/demos), trained alone first ("warm-up", task
  ``duetface_client``) and then frozen;
- the **server** gets the other 162 channels and runs an IR-18/IR-50 with an
  **interactive block** after the last unit of each of the 4 stages.

Interactive block of stage s (TFace ``duetface_model.py: InteractiveBlock``),
split here into its two halves so the deployment split is explicit:

- ``AttentionMask`` (computed where the client activations are): the client
  feature map of stage s (outputs of client blocks conv_23, conv_34, conv_45,
  conv_6_sep) -> bilinear resize to the server map size (align_corners=False,
  torch ``Upsample(size=...)``) -> 1x1 "interface" conv to the server width ->
  mean over channels -> per-sample min-max normalisation -> x the facial ROI
  (resized bilinearly, align_corners=True as the reference's
  ``interpolate(scale_factor=...)``) -> min-max again -> M (N, h, w, 1);
- ``MaskOverlay`` (on the server): ``sigmoid(F) + w * sigmoid(F) * M`` with a
  learned scalar w initialised to 0 (so the block starts as ``sigmoid(F)``,
  not the identity - as in the reference).

Differences from the reference, on purpose:

- the interface conv is an ordinary trained parameter (the reference builds a
  fresh randomly initialised conv inside every forward call, so it is never
  trained and its output changes from call to call). Its initialisation is
  torch's Conv2d default, the distribution the reference redraws from.
- min-max normalisation guards a constant map (an empty ROI): the reference
  divides 0 by 0 there (NaN); here the mask becomes 0 and the block is
  ``sigmoid(F)``. Gradients flow through the per-sample min and max (the
  reference takes them as constants with ``.item()``; its interface is never
  trained so this never mattered there).
- The channel mean of a 1x1 conv is a 1x1 conv with the mean kernel, and the
  bilinear resize commutes with both, so the mask is computed as a single
  C -> 1 projection at the client resolution, then resized: the same numbers
  as "resize, C -> C' conv, mean" without the (N, 56, 56, 64) .. (N, 7, 7, 512)
  intermediate.

Deployment: ``DuetFaceTask.client_side(variables, images)`` returns exactly
what crosses the network - the 162 server channels and the 4 attention masks
(never the 30 low-frequency channels, the image or the landmarks) - and
``DuetFaceTask.server_side(variables, transmitted)`` needs only the server's
parameters.

Parameter names follow the reference's ``DuetFaceModel`` state_dict through
the table ``torch_rename`` (``server_model.body.<i>.embedding_layer.weight``
is our ``server_model/body_<i>/embedding_layer/weight`` as is; the interface
conv of stage s, ``server_model.body.<i>.embedding_layer.interface.1``, which
the reference only creates during a forward pass, is ``attention_<s>``).

Facial ROI (``config.duetface.roi_source``): ``'dataset'`` (batch key
``landmarks``, (B, 98, 2) normalised, x = column), ``'pfld'`` (a frozen PFLD
detector in the graph, weights from ``config.duetface.pfld_checkpoint``) or
``'template'`` (a constant hull for aligned faces); all rasterised on the
accelerator by ``ppfr_jax.roi``. A training batch may instead carry the mask
itself, ``batch['roi']`` (B, 112, 112, 1) in [0, 1], which then replaces it
(``DuetFaceTask.batch_features``; used by the training-parity run).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ppfr_jax import checkpoints, frequency, models, roi, tasks
from ppfr_jax.checkpoint_import import torch_to_flax
from ppfr_jax.errors import PpfrError
from ppfr_jax.models import iresnet, mobilefacenet

Dtype = Any

NUM_STAGES = 4
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- resizing


@functools.lru_cache(maxsize=None)
def resize_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    """1-D bilinear resampling matrix (n_out, n_in) with torch's conventions (float64).

    ``align_corners=False`` is ``nn.Upsample(size=n_out, mode='bilinear')``
    (half-pixel centres, source index clamped at 0); ``align_corners=True``
    maps the corner pixels onto each other (``interpolate(...,
    align_corners=True)``; torch ignores ``scale_factor`` for the weights then).
    """
    if n_in == n_out:
        return np.eye(n_out)
    return frequency.bilinear_matrix(n_in, n_out, align_corners)


def resize_bilinear(x: jax.Array, size: int, align_corners: bool) -> jax.Array:
    """(N, H, W, C) -> (N, size, size, C), bilinear with torch's corner convention."""
    mh = jnp.asarray(resize_matrix(x.shape[1], size, align_corners), x.dtype)
    mw = jnp.asarray(resize_matrix(x.shape[2], size, align_corners), x.dtype)
    return jnp.einsum("ih,nhwc,jw->nijc", mh, x, mw, precision=_HIGHEST)


def minmax_normalise(m: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Per-sample (m - min) / (max - min) over all but the batch axis; a constant map gives 0."""
    axes = tuple(range(1, m.ndim))
    lo = jnp.min(m, axis=axes, keepdims=True)
    hi = jnp.max(m, axis=axes, keepdims=True)
    return (m - lo) / jnp.maximum(hi - lo, eps)


# ----------------------------------------------------------------------------- interactive block


def _torch_conv_init(fan_in: int):
    """torch Conv2d's default: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class AttentionMask(nn.Module):
    """Client half of an interactive block: client feature map (+ ROI) -> mask M.

    Params: ``kernel`` (1, 1, C_client, features) and ``bias`` (features,), the
    reference's interface ``Conv2d(C_client, features, 1)``.

    Call: ``(feature, roi=None)``; feature (N, h', w', C_client) NHWC, roi
    (N, 112, 112) in {0, 1} or None (the reference's "deprecated" 2-input path).
    Returns M (N, size, size, 1) float32 in [0, 1].
    """

    features: int  # server channels at this stage (the interface conv's outputs)
    size: int  # server map size at this stage

    @nn.compact
    def __call__(self, feature, roi_mask=None):
        c = feature.shape[-1]
        kernel = self.param("kernel", lambda k, s: _torch_conv_init(c)(k, s), (1, 1, c, self.features))
        bias = self.param("bias", lambda k, s: _torch_conv_init(c)(k, s), (self.features,))
        x = jnp.asarray(feature, jnp.float32)
        # mean_c(conv(x)) == conv with the mean kernel; resize commutes with it (rows sum to 1)
        m = jnp.einsum("nhwc,c->nhw", x, jnp.mean(kernel[0, 0], axis=-1), precision=_HIGHEST) + jnp.mean(bias)
        m = resize_bilinear(m[..., None], self.size, align_corners=False)
        m = minmax_normalise(m)
        if roi_mask is not None:
            if roi_mask.ndim == 4:
                roi_mask = roi_mask[..., 0]
            r = resize_bilinear(jnp.asarray(roi_mask, jnp.float32)[..., None], self.size, align_corners=True)
            m = minmax_normalise(m * r)
        return m


class MaskOverlay(nn.Module):
    """Server half of an interactive block: ``sigmoid(F) + w * sigmoid(F) * M``; param ``weight`` (w, init 0)."""

    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        w = self.param("weight", nn.initializers.zeros, (), self.param_dtype)
        s = nn.sigmoid(x)
        return s + jnp.asarray(w, x.dtype) * s * jnp.asarray(mask, x.dtype)


class InteractiveBlock(nn.Module):
    """The whole block (both halves), as the reference's ``InteractiveBlock``: (F, client map[, ROI]) -> F'.

    F (N, h, w, C) NHWC; the mask is computed at F's size and width.
    """

    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, feature, roi_mask=None):
        m = AttentionMask(x.shape[-1], x.shape[1], name="interface")(feature, roi_mask)
        return MaskOverlay(self.param_dtype, name="overlay")(x, m)


# ----------------------------------------------------------------------------- models


CLIENTS = models.CLIENT_BACKBONES


def build_client(name: str, in_channels: int = 30, embedding_size: int = 512, dtype=jnp.float32) -> nn.Module:
    """The client backbone ``name`` (``models.CLIENT_BACKBONES``: ``'mobilefacenet'``, the paper's, or
    ``'mobilefacenet_tiny'``) with DuetFace's client output layer. Raises ValueError for another name."""
    if name not in models.CLIENT_BACKBONES:
        raise ValueError(f"config.duetface.client_backbone: unknown client {name!r}; choose one of "
                         f"{models.CLIENT_BACKBONES}")
    return models.get_model(name, in_channels=in_channels, embedding_size=embedding_size, head="client", dtype=dtype)


class DuetFaceModel(nn.Module):
    """Client backbone + server IResNet with an interactive block after each stage.

    Fields: ``server_model`` (an ``IResNet`` with ``in_channels`` = server
    channels) and ``client_model`` (``MobileFaceNet`` / ``MobileFaceNetTiny``, client head).
    Variables: ``client_model/...``, ``server_model/...`` (incl.
    ``body_<i>/embedding_layer/weight``) and ``attention_<s>/{kernel,bias}``.

    Methods (``model.apply(variables, ..., method=...)``):

    - ``__call__(x_server, x_client, roi=None, train=False)`` -> (N, E) embedding;
    - ``client_side(x_client, roi=None)`` -> tuple of 4 masks (N, h_s, w_s, 1)
      (needs ``client_model`` and ``attention_*`` variables only);
    - ``server_side(x_server, masks, train=False, return_stages=False)`` ->
      embedding (needs ``server_model`` only).

    Inputs NHWC: x_server (N, 112, 112, 162), x_client (N, 112, 112, 30), roi
    (N, 112, 112). The client always runs in inference mode (frozen).
    """

    server_model: nn.Module
    client_model: nn.Module

    def setup(self):
        s = self.server_model
        n_down = s.input_stride
        sizes = [s.input_size // (n_down * 2 ** (k + 1)) for k in range(NUM_STAGES)]
        if len(s.widths) != NUM_STAGES:
            raise ValueError(f"DuetFace's server needs {NUM_STAGES} stages, got widths {tuple(s.widths)}")
        self.attention = [AttentionMask(w, sz) for w, sz in zip(s.widths, sizes)]

    def client_side(self, x_client, roi_mask=None):
        _, feats = self.client_model(x_client, train=False, return_features=True)
        feats = jax.lax.stop_gradient(feats)
        return tuple(att(f, roi_mask) for att, f in zip(self.attention, feats))

    def server_side(self, x_server, masks, train: bool = False, return_stages: bool = False):
        pd = self.server_model.param_dtype

        def hook(stage, unit_index, x):
            # runs inside the stage's last unit: server_model/body_<i>/embedding_layer, as torch's
            return MaskOverlay(pd, name="embedding_layer")(x, masks[stage])

        return self.server_model(x_server, train, stage_hook=hook, return_stages=return_stages)

    def __call__(self, x_server, x_client, roi_mask=None, train: bool = False):
        return self.server_side(x_server, self.client_side(x_client, roi_mask), train)


def build_model(backbone: str = "ir18", client_backbone: str = "mobilefacenet", *, embedding_size: int = 512,
                client_embedding_size: int = 512, dropout: float = 0.4, sub_channels=frequency.SUB_CHS,
                dtype=jnp.float32) -> DuetFaceModel:
    """DuetFace with an IR ``backbone`` on the server channels and ``client_backbone`` on the client's."""
    n_client = 3 * len(sub_channels)
    server = tasks.build_backbone(backbone, embedding_size, dropout, dtype)
    if not isinstance(server, iresnet.IResNet):
        raise ValueError(f"config.model.backbone: DuetFace's server must be an IR network, got {backbone!r}")
    server = server.clone(in_channels=frequency.NUM_CHANNELS - n_client)
    client = build_client(client_backbone, n_client, client_embedding_size, dtype)
    return DuetFaceModel(server_model=server, client_model=client)


def torch_rename(model: DuetFaceModel) -> dict[str, str]:
    """Flax module path prefix -> PyTorch module path of the reference ``DuetFaceModel`` (for ``torch_to_flax``)."""
    table = {f"client_model/{k}": f"client_model.{v}" for k, v in mobilefacenet.CLIENT_TORCH_RENAME.items()}
    s = model.server_model
    last = [u.index for u in iresnet.unit_plan(s.stage_sizes, s.widths) if u.last_in_stage]
    for stage, i in enumerate(last):
        table[f"attention_{stage}"] = f"server_model.body.{i}.embedding_layer.interface.1"
    return table


def import_torch_state_dict(state_dict: Mapping[str, Any], variables: Mapping[str, Any], model: DuetFaceModel,
                            *, strip_prefix: str | None = None) -> dict:
    """Reference ``DuetFaceModel`` state_dict -> our variables.

    The state_dict must contain the interface convs
    (``server_model.body.<i>.embedding_layer.interface.1.{weight,bias}``),
    which the reference only adds during its first forward pass.
    """
    return torch_to_flax(state_dict, variables, rename=torch_rename(model), strip_prefix=strip_prefix)


# ----------------------------------------------------------------------------- checkpoints


class ClientCheckpointNotFound(PpfrError, FileNotFoundError):
    """DuetFace server training was asked to start without a trained client."""


def load_pfld_variables(path: str) -> dict:
    """PFLD weights: a reference ``.pth`` (state_dict under ``pfld_backbone``, read without torch) or an
    Orbax directory written by ``ppfr-import --model pfld``. -> ``{'params', 'batch_stats'}`` numpy."""
    from ppfr_jax.models import pfld

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
    from ppfr_jax.torch_pickle import find_state_dict, load_torch_file
    obj = load_torch_file(path)
    key = "pfld_backbone" if isinstance(obj, Mapping) and "pfld_backbone" in obj else None
    sd = {k: v for k, v in find_state_dict(obj, key, path=path).items() if isinstance(v, np.ndarray)}
    return pfld.import_torch_state_dict(sd, target, strip_prefix="module.")


# ----------------------------------------------------------------------------- training tasks


# kept under its old name: the split is frequency.split_channels (contiguous slices)
split_dct = frequency.split_channels


def split_input(images, sub_channels=frequency.SUB_CHS, dtype=jnp.float32):
    """uint8 / [-1, 1] RGB (N, 112, 112, 3) -> (server (N,112,112,162), client (N,112,112,30)) DCT channels."""
    x = tasks.normalise_images(images)
    server, client = split_dct(frequency.dct_transform(x), sub_channels)
    return server.astype(dtype), client.astype(dtype)


def _sub_channels(config):
    d = config.get("duetface", None)
    return tuple(d.get("sub_channels", frequency.SUB_CHS)) if d is not None else frequency.SUB_CHS


@tasks.register("duetface_client")
class DuetFaceClientTask(tasks.RecognitionTask):
    """Stage 1 ("warm-up"): the client backbone alone on the 30 low-frequency channels, with its own head.

    Config: ``duetface.client_backbone`` (``'mobilefacenet'`` / ``'mobilefacenet_tiny'``),
    ``model.embedding_size``, ``head.*``. Variables as ``RecognitionTask``
    (``params/backbone`` is the client), which is what stage 2 loads.
    """

    def __init__(self, config, num_classes: int, padded_classes: int | None = None):
        super().__init__(config, num_classes, padded_classes)
        self.sub_channels = _sub_channels(config)
        self.backbone = build_client(config.duetface.client_backbone, 3 * len(self.sub_channels),
                                     config.model.embedding_size, self.dtype)

    def model_input(self, images, rng=None):
        return split_input(images, self.sub_channels, self.dtype)[1]


ROI_SOURCES = ("dataset", "pfld", "template")


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
        self.sub_channels = _sub_channels(config)
        self.model = build_model(m.backbone, d.client_backbone, embedding_size=m.embedding_size,
                                 client_embedding_size=d.client_embedding_size, dropout=m.get("dropout", 0.4),
                                 sub_channels=self.sub_channels, dtype=self.dtype)
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
            from ppfr_jax.models import pfld
            self.pfld = pfld.PFLDInference()
            self.frozen["pfld"] = load_pfld_variables(d.get("pfld_checkpoint", ""))

    # -- set-up --------------------------------------------------------------------------------
    def _load_client(self, config) -> dict:
        d = config.duetface
        wd = d.get("client_workdir", "") or ""
        how = d.get("client_command", "") or (
            "python -m ppfr_jax.main --config configs/duetface.py:client --workdir runs/duetface_client")
        hint = (f"Train the client first:\n    {how}\nthen point the server run at it: "
                f"--config.duetface.client_workdir=<that workdir>")
        if not wd:
            raise ClientCheckpointNotFound(
                "config.duetface.client_workdir is empty: DuetFace server training freezes the client of a "
                "finished warm-up run (task 'duetface_client') and needs its workdir. " + hint)
        try:
            variables, step = checkpoints.restore_variables(wd, int(d.get("client_step", 0) or 0) or None)
        except FileNotFoundError as e:
            raise ClientCheckpointNotFound(
                f"config.duetface.client_workdir={wd!r}: {e}; DuetFace server training needs a trained "
                f"client. " + hint) from None
        got = {"params": variables["params"].get("backbone"),
               "batch_stats": variables.get("batch_stats", {}).get("backbone", {})}
        if got["params"] is None:
            raise ClientCheckpointNotFound(
                f"config.duetface.client_workdir={wd!r}: the checkpoint of step {step} has no client backbone "
                f"(params: {sorted(variables['params'])}); is it a 'duetface_client' run? " + hint)
        x = jax.ShapeDtypeStruct((1, 112, 112, 3 * len(self.sub_channels)), jnp.float32)
        want = jax.eval_shape(functools.partial(self.model.client_model.init, train=False), jax.random.key(0), x)
        shapes = lambda t: jax.tree.map(lambda a: tuple(a.shape), t)
        if shapes(got) != shapes({"params": want["params"], "batch_stats": want.get("batch_stats", {})}):
            raise ValueError(
                f"config.duetface.client_backbone={d.client_backbone!r} / client_embedding_size="
                f"{d.client_embedding_size} do not match the client saved in {wd!r} (step {step}); use the "
                f"warm-up run's settings")
        if jax.process_index() == 0:
            print(f"DuetFace: frozen client from {os.path.abspath(wd)} (step {step})", flush=True)
        return got

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

    def client_side(self, variables, images, landmarks=None) -> dict:
        """What the client sends: ``{'server_channels': (B,112,112,162), 'attention_masks': 4 x (B,h,w,1)}``.

        ``images``: uint8 or [-1, 1] RGB (B, 112, 112, 3). ``landmarks`` (B, 98, 2) is
        used when ``roi_source='dataset'``; otherwise ``eval_roi_source`` picks the ROI.
        """
        x = tasks.normalise_images(images)
        x_server, x_client = split_input(x, self.sub_channels, self.dtype)
        src = self.roi_source if landmarks is not None else self.eval_roi_source
        r = self.roi_mask(variables, x, landmarks, src)
        v = self._model_variables(variables["params"], variables)
        masks = self.model.apply(v, x_client, r, method=DuetFaceModel.client_side)
        return {"server_channels": x_server, "attention_masks": masks}

    def server_side(self, variables, transmitted) -> jax.Array:
        """Embedding (B, E) from ``client_side``'s output; reads only the server's variables."""
        v = {"params": {"server_model": variables["params"]["duetface"]["server_model"]},
             "batch_stats": {"server_model": variables["batch_stats"]["duetface"]["server_model"]}}
        return self.model.apply(v, transmitted["server_channels"], transmitted["attention_masks"],
                                method=DuetFaceModel.server_side)

    # -- task interface --------------------------------------------------------------------------
    def init(self, rng, images, labels):
        r_m, r_h = jax.random.split(rng)
        x = tasks.normalise_images(images)
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
        x = tasks.normalise_images(images)
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
        x = tasks.normalise_images(images)
        x_server, x_client = split_input(x, self.sub_channels, self.dtype)
        r = self.roi_mask(variables, x, None, self.eval_roi_source)
        return self.model.apply(self._model_variables(variables["params"], variables), x_server, x_client, r,
                                train=False)

