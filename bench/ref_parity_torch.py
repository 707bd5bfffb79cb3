"""Reference side of ``bench/train_parity.py``: N SGD steps of the PyTorch reference (TFace) from given inputs.

Runs in the REFERENCE's virtual environment (torch, numpy, scipy, pyyaml), never in ours, and
imports the reference modules at run time from ``--tface`` / ``--torchjpeg`` through
``../shared/reference/make_golden.py``'s ``setup_reference`` (nothing of the reference is in
this checkout)::

    REFVENV/bin/python bench/ref_parity_torch.py --tface DIR/TFace --torchjpeg DIR/torchjpeg \\
        --inputs IN.npz --settings SETTINGS.json --out OUT.npz

``IN.npz``: ``images`` (B, 3, 112, 112) float32 in [-1, 1], ``labels`` (B,) int64, for
``minusface_stage2`` also ``perms`` (steps, n_duplicate, B, 192) int64 (the channel shuffle
of every step, used instead of ``torch.randperm``), for ``duetface_int`` also ``roi``
(B, 1, 112, 112) float32 (the landmark ROI mask, used instead of PFLD + scipy).
``SETTINGS.json``: ``case``, ``steps``, ``lr``, ``momentum``, ``weight_decay``,
``num_classes``, ``generator_lr_mult`` (MinusFace stage 1), ``embedding_size``, for
``duetface_int`` also ``sub_channels`` and ``client_embedding_size``.

Each case is built and stepped as ``ref_bench.py`` builds it (the trainers' ``loop_step``),
with two changes that make the two sides comparable: dropout set to 0 (its masks cannot be
drawn alike), and weight decay on every parameter of the model and head (what the
reference's ``separate_resnet_bn_paras`` does for these models: no parameter name contains
``bn``) at ``lr`` times ``generator_lr_mult`` for MinusFace's generator.

``duetface_int`` (``DuetFaceModel(30, 512, 512, 'IR_18', 'MobileFaceNet')``, client frozen
in eval() and outside the optimiser, ``model(*_images_to_dct(x, sub_channels),
landmark_inference=roi)``) needs one more, a patch of the reference's behaviour:
``InteractiveBlock`` re-creates its 1x1 interface conv with fresh random weights in every
forward (never trained; ours is a learned parameter). ``keep_interface_once`` patches the
class at run time so each block keeps the conv of its first forward; that forward runs in
eval() before the state_dict is saved and the optimiser built, so the interface convs are in
``init/`` and are trained (with weight decay) like every server parameter.

``OUT.npz``: ``init/<torch key>`` (the state_dict before the first step: model ``model.*``,
head ``head.kernel``), ``final/<torch key>`` (after the last step), ``losses`` (steps,).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_REF = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "reference"))


def keep_interface_once(block_cls):
    """Parity patch of ``InteractiveBlock``: the interface conv is made once, then kept and trained.

    The reference assigns ``self.interface = nn.Sequential(Upsample, Conv2d)`` with fresh random
    weights in EVERY forward, so that conv is never trained and changes from call to call; ours
    is a learned parameter. Patched here, on the class at run time (the reference files are not
    touched): an assignment to ``interface`` when one is already registered is ignored, so the
    forward still builds (and discards) a new one but applies the first. Nothing else of the
    forward changes.
    """
    def __setattr__(self, name, value):
        if name == "interface" and isinstance(value, torch.nn.Module) and self._modules.get("interface") is not None:
            return
        torch.nn.Module.__setattr__(self, name, value)
    block_cls.__setattr__ = __setattr__


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tface", required=True)
    ap.add_argument("--torchjpeg", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--settings", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--make-golden-dir", default=SHARED_REF,
                    help="folder holding make_golden.py (default ../shared/reference)")
    a = ap.parse_args(argv)
    sys.path.insert(0, a.make_golden_dir)
    import make_golden as mg  # noqa: E402  (the reference's import shims)

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    mg.patch_cuda()
    mg.init_single_process_group("gloo")
    R = mg.setup_reference(a.tface, a.torchjpeg, test_utils=False)

    s = json.load(open(a.settings))
    inp = np.load(a.inputs)
    x = torch.from_numpy(inp["images"]).float()
    labels = torch.from_numpy(inp["labels"]).long()
    case = s["case"]
    emb = int(s.get("embedding_size", 512))

    init_value = torch.FloatTensor(emb, s["num_classes"])
    torch.nn.init.normal_(init_value, std=0.01)
    head = R.df_arcface.ArcFace(in_features=emb, gpu_index=0, weight_init=init_value,
                                class_split=R.utils.get_class_split(s["num_classes"], 1), scale=64.0, margin=0.5)
    ce = R.loss.get_loss("DistCrossEntropy")

    perms = None
    if case in ("arcface_ir18_rgb", "arcface_ir50_rgb"):
        model = R.get_model("IR_18" if case == "arcface_ir18_rgb" else "IR_50")([112, 112])
        groups = [{"params": list(model.parameters()), "lr": s["lr"]}]

        def forward():
            return model(x), None
    elif case in ("minusface_stage1", "minusface_stage2"):
        stage = case.rsplit("_", 1)[1]
        generator = None
        if stage == "stage2":  # partialface base_task.make_model
            import copy
            pre = R.mf.MinusBackbone(mode="stage1", recognizer=R.get_model("IR_18")([112, 112]))
            pre.generator.mode = stage
            generator = copy.deepcopy(pre.generator)
        model = R.mf.MinusBackbone(mode=stage, n_duplicate=int(s.get("n_duplicate", 1)), generator=generator,
                                   recognizer=R.get_model("IR_18")([112, 112]))
        mloss = R.mf.MinusLoss(mode=stage)
        if stage == "stage2":
            perms = torch.from_numpy(inp["perms"]).long()
            step_box = [0]

            def shuffle(r):  # MinusBackbone.shuffle with the recorded permutations
                b, c, h, w = r.shape
                outs = []
                for p in perms[step_box[0]]:
                    idx = p.view(b, c, 1, 1).expand(-1, -1, h, w)
                    outs.append(model.decoder(torch.gather(r, 1, idx)))
                return torch.cat(outs, dim=1)
            model.shuffle = shuffle
        groups = [{"params": list(model.generator.parameters()), "lr": s["lr"] * s.get("generator_lr_mult", 1.0)},
                  {"params": list(model.recognizer.parameters()), "lr": s["lr"]}]
    elif case == "duetface_int":
        keep_interface_once(R.dm.InteractiveBlock)
        model = R.dm.DuetFaceModel(30, emb, int(s.get("client_embedding_size", 512)), main_model_name="IR_18",
                                   sub_model_name="MobileFaceNet")
        roi = torch.from_numpy(inp["roi"]).float()
        sub_chs = [int(c) for c in s["sub_channels"]]

        def forward():
            main_inputs, sub_inputs = R.dtrain._images_to_dct(x, sub_channels=sub_chs)
            return model(main_inputs, sub_inputs, landmark_inference=roi, warm_up=False), None

        # one forward in eval() (no BatchNorm statistics move) creates each block's interface conv,
        # which the patch then keeps; only now are they in the state_dict and the optimiser
        model.eval()
        with torch.no_grad():
            forward()
        n_iface = sum(1 for k in model.state_dict() if ".interface." in k)
        if n_iface != 8:
            raise SystemExit(f"expected 4 interface convs (8 tensors) after the first forward, got {n_iface}")
        kept = [(blk, blk.interface) for blk in model.modules() if isinstance(blk, R.dm.InteractiveBlock)]
        # the client is frozen (DuetFaceModel.forward sets requires_grad=False on it): not in the optimiser
        groups = [{"params": list(model.server_model.parameters()), "lr": s["lr"]}]
    else:
        raise SystemExit(f"unknown case {case!r}")

    for m in model.modules():  # dropout masks cannot be drawn alike on both sides
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    init_sd = {f"model.{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()}
    init_sd["head.kernel"] = head.kernel.detach().numpy().copy()

    bopt = torch.optim.SGD(groups, lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    hopt = torch.optim.SGD([{"params": head.parameters()}], lr=s["lr"], momentum=s["momentum"],
                           weight_decay=s["weight_decay"])
    model.train()
    head.train()
    if case == "minusface_stage2":
        model.generator.eval()
    if case == "duetface_int":  # train.py loop_step: the client model in eval()
        for m in model.modules():
            if isinstance(m, R.lb.ClientBackbone):
                m.eval()
    losses = []
    for i in range(int(s["steps"])):
        if case.startswith("minusface"):
            step_box_i = i
            if perms is not None:
                step_box[0] = step_box_i
            x_encode, x_residue, x_feature, x_latent = model(x)
            outputs, part_labels, _ = head(x_feature, labels)
            loss = mloss(x, x_encode, x_latent, outputs, part_labels)[0]
        else:
            feats, _ = forward()
            outputs, part_labels, _ = head(feats, labels)
            loss = ce(outputs, part_labels)
        bopt.zero_grad()
        hopt.zero_grad()
        loss.backward()
        bopt.step()
        hopt.step()
        losses.append(float(loss.item()))
    if case == "duetface_int" and not all(blk.interface is iface for blk, iface in kept):
        raise SystemExit("keep_interface_once: an InteractiveBlock replaced its interface conv during training")
    out = {f"init/{k}": v for k, v in init_sd.items()}
    out.update({f"final/model.{k}": v.detach().numpy() for k, v in model.state_dict().items()})
    out["final/head.kernel"] = head.kernel.detach().numpy()
    out["losses"] = np.asarray(losses, np.float64)
    np.savez(a.out, **out)
    info = {"case": case, "losses": losses}
    if case == "duetface_int":
        info["reference_patch"] = "InteractiveBlock interface conv made once (first forward, eval) and trained"
    print(json.dumps(info))


if __name__ == "__main__":
    main()
