"""Reference side of ``bench/ref_minusface_demo.py``: the PyTorch reference's MinusFace trained on given batches.

Runs in the REFERENCE's virtual environment (torch, numpy, scipy, pyyaml) and imports the
reference modules at run time from ``--tface`` / ``--torchjpeg`` through
``../shared/reference/make_golden.py``'s ``setup_reference`` (nothing of the reference is in
this checkout)::

    REFVENV/bin/python bench/ref_minusface_train.py --tface DIR/TFace --torchjpeg DIR/torchjpeg \\
        --stage stage1 --batches B.npz --settings S.json --out DIR [--stage1-state DIR/step_42.npz]

``B.npz``: ``images`` (steps, B, 112, 112, 3) uint8 and ``labels`` (steps, B) int64: the batch of
every step (the driver takes them from our demo pipeline, so both sides see the same faces in the
same order). ``S.json``: ``lrs`` (the LR of every step, from our schedule), ``momentum``,
``weight_decay``, ``generator_lr_mult`` (stage 1), ``num_classes``, ``embedding_size``, ``scale``,
``margin``, ``generator_widths`` (5 ints), ``ir_stem``, ``ir_widths`` (4 ints, one unit per stage),
``n_duplicate``, ``save_steps``, ``seed``.

The model is the reference's ``MinusBackbone`` (its ``MinusGenerativeModel`` with the reference
``UNet``, its IR ``Backbone`` as recogniser, its forward, ``shuffle`` with ``torch.randperm`` per
sample per step, ``MinusLoss``) and its dist-FC ``ArcFace`` head with ``DistCrossEntropy``, stepped as
``tasks/partialface/train.py``'s ``loop_step`` does, with the demo's sizes: the reference hard-codes
U-Net widths 64..1024 and IR-18 (64..512, 2 units per stage, 512-d), so after building them the
layers are rebuilt with the reference's own building blocks (``ConvBlock``, ``ConvTranspose2d``,
``BasicBlockIR``) at the demo's widths (U-Net 4-8-16-32-64, IR 8 / 8-16-16-32 with one unit per
stage, 128-d embedding, dropout 0), and the recogniser re-initialised with the reference's
``initialize_weights`` (its input layer keeps torch's default, as MinusBackbone's replacement does).

Optimiser: SGD momentum 0.9, weight decay on every parameter (what the reference runs: its
MinusFace optimiser branch tests ``METHOD == 'Minusface'`` against the yaml's ``'MinusFace'`` and never
fires, and ``separate_resnet_bn_paras`` finds no name containing ``bn``), head on its own SGD; the
generator at ``generator_lr_mult`` x the LR in stage 1 (our demo's 0.1, the reference README's;
as executed the reference would use x1, see above); the LR of each step is set from ``lrs``.
Stage 2: a new ``MinusBackbone(mode='stage2')`` around a deep copy of stage 1's generator (loaded
from ``--stage1-state``), generator in eval() and outside the optimiser, a fresh recogniser and head.

Writes ``OUT/step_<n>.npz`` (``model.*`` state_dict, ``head.kernel``) and ``OUT/optim_<n>.pt`` (both
SGD states: ``--resume-from OUT/step_<n>.npz`` continues from there) at each of ``save_steps`` and
``OUT/log.jsonl`` (one line per step: loss, loss_gen, loss_fr, train top-1, lr, wall seconds).
"""
import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_REF = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "reference"))


def resize_unet(unet, widths, in_ch=192, out_ch=192):
    """Rebuild the reference ``UNet``'s layers at ``widths`` (its encode/decode stay the reference's)."""
    from tasks.minusface.utils import ConvBlock
    w1, w2, w3, w4, w5 = widths
    unet.left_conv_1 = ConvBlock(in_ch, w1, w1)
    unet.left_conv_2 = ConvBlock(w1, w2, w2)
    unet.left_conv_3 = ConvBlock(w2, w3, w3)
    unet.left_conv_4 = ConvBlock(w3, w4, w4)
    unet.left_conv_5 = ConvBlock(w4, w5, w5)

    def deconv(i, o):
        return nn.ConvTranspose2d(i, o, kernel_size=3, stride=2, padding=1, output_padding=1)
    unet.deconv_1, unet.right_conv_1 = deconv(w5, w4), ConvBlock(2 * w4, w4, w4)
    unet.deconv_2, unet.right_conv_2 = deconv(w4, w3), ConvBlock(2 * w3, w3, w3)
    unet.deconv_3, unet.right_conv_3 = deconv(w3, w2), ConvBlock(2 * w2, w2, w2)
    unet.deconv_4, unet.right_conv_4 = deconv(w2, w1), ConvBlock(2 * w1, w1, w1)
    unet.right_conv_5 = nn.Conv2d(w1, out_ch, kernel_size=1, stride=1, padding=0)
    return unet


def resize_ir(backbone, stem, widths, emb, in_ch):
    """Rebuild the reference IR ``Backbone`` with one ``BasicBlockIR`` per stage at ``widths``."""
    from torchkit.backbone.model_irse import BasicBlockIR
    from torchkit.backbone.common import initialize_weights, Flatten
    units, c = [], stem
    for w in widths:
        units.append(BasicBlockIR(c, w, 2))
        c = w
    backbone.body = nn.Sequential(*units)
    backbone.output_layer = nn.Sequential(nn.BatchNorm2d(c), nn.Dropout(0.0), Flatten(),
                                          nn.Linear(c * 7 * 7, emb), nn.BatchNorm1d(emb, affine=False))
    initialize_weights(backbone.modules())
    # MinusBackbone's replacement input layer, torch default init (as in the reference)
    backbone.input_layer = nn.Sequential(nn.Conv2d(in_ch, stem, (3, 3), 1, 1, bias=False),
                                         nn.BatchNorm2d(stem), nn.PReLU(stem))
    return backbone


def fast_transforms(dct_transform, idct_transform):
    """Sparse-matrix versions of the reference's ``dct_transform`` / ``idct_transform``, the same functions.

    The reference's transforms upsample every face 8x (to 896x896), convert the colours, take 8x8
    block DCTs (and back, then downsample and clamp): ~15 s for 32 faces on this shared CPU, which
    would make one reference stage-2 step ~100 s. All of it but the final clamp is affine and
    separable and banded, so each is a few shifted multiply-adds per axis plus a 3x3 colour mix. The matrices
    are read off the reference's own pieces (``F.interpolate`` with its arguments, torchjpeg's
    ``block_dct`` / ``block_idct``, ``to_ycbcr`` / ``to_rgb``); ``check_transforms`` compares the
    results with the original functions before training.
    """
    import torch.nn.functional as F
    from torchjpeg import dct as tj
    n, big = 112, 896
    eye = torch.eye(n, dtype=torch.float64).view(n, 1, n, 1)
    up = F.interpolate(eye, scale_factor=(8, 1), mode="bilinear", align_corners=True).view(n, big).T  # (896, 112)
    eyeb = torch.eye(big, dtype=torch.float64).view(big, 1, big, 1)
    down = F.interpolate(eyeb, scale_factor=(1 / 8, 1), mode="bilinear",
                         align_corners=True).view(big, n).T  # (112, 896)
    basis = torch.eye(64).view(64, 1, 1, 8, 8)  # torchjpeg's harmonics are float32
    w_dct = tj.block_dct(basis).reshape(64, 64).T.double()  # [out (p,q), in (r,s)]
    w_idct = tj.block_idct(basis).reshape(64, 64).T.double()  # [out (r,s), in (p,q)]
    c00 = torch.sqrt(w_dct[0, 0])
    c = torch.stack([w_dct[p * 8, torch.arange(8) * 8] for p in range(8)]) / c00  # C[p, r]
    assert torch.allclose(w_dct, torch.kron(c, c), atol=1e-6), "block_dct is not the separable DCT-II"
    assert torch.allclose(w_idct, torch.kron(c, c).T, atol=1e-6), "block_idct is not block_dct's transpose"
    k_dct = torch.einsum("pr,irh->pih", c, up.reshape(n, 8, n)).float()  # (p, i, h)
    k_idct = torch.einsum("air,pr->pai", down.reshape(n, n, 8), c).float()  # (p, a, i)
    zero = torch.zeros(1, 3, 1, 1)
    off_y = tj.to_ycbcr(zero).view(3)
    m_y = torch.stack([tj.to_ycbcr(torch.eye(3)[k].view(1, 3, 1, 1)).view(3) - off_y for k in range(3)], 1)  # [out, in]
    off_r = tj.to_rgb(zero).view(3)
    m_r = torch.stack([tj.to_rgb(torch.eye(3)[k].view(1, 3, 1, 1)).view(3) - off_r for k in range(3)], 1)
    off_y, off_r = off_y.float(), off_r.float()

    # Each 1-d operator is banded (an output row reads 2-3 neighbouring input rows): applied as a few
    # shifted multiply-adds, laid out so that no large tensor is permuted (the 192-channel tensors
    # (B, 3, 8, 8, 112, 112) are ~600 MB at batch 64; dense products or 6-d permutes cost seconds)
    def band(k):
        """(Q, n_out, n_in) -> (offsets, (Q, n_out, len(offsets))): k[q, o, o + d] for each offset d."""
        nz = k.abs() > 1e-12
        offs = sorted({int(h) - int(o) for _, o, h in nz.nonzero().tolist()})
        q, n_out, n_in = k.shape
        k3 = torch.zeros(q, n_out, len(offs))
        for t, d in enumerate(offs):
            o = torch.arange(n_out)
            ok = (o + d >= 0) & (o + d < n_in)
            k3[:, o[ok], t] = k[:, o[ok], o[ok] + d]
        assert abs(float(k3.abs().sum() - k.abs().sum())) < 1e-4 * float(k.abs().sum()), "band lost entries"
        return offs, k3

    def shifted(x, offs, dim):
        """x shifted along ``dim`` by each offset (zero outside), as views of one padded copy."""
        lo, hi = max(0, -offs[0]), max(0, offs[-1])
        pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [lo, hi]
        xp = torch.nn.functional.pad(x, pad)
        n = x.shape[dim]
        return [xp.narrow(dim, lo + d, n) for d in offs]

    d_offs, d_k3 = band(k_dct)  # (8, 112 out i, 112 in h)
    i_offs, i_k3 = band(k_idct)  # (8, 112 out a, 112 in i)

    def dct(x):
        b = x.shape[0]
        z = (x * 0.5 + 0.5) * 255
        y = torch.einsum("ck,bkhw->bchw", m_y, z) + (off_y - 128).view(1, 3, 1, 1)  # b c h w
        # rows: t[b, c, p, i, w] = sum_d K[p, i, d] y[b, c, i + d, w]
        t = sum(d_k3[:, :, t_].view(1, 1, 8, n, 1) * ys.unsqueeze(2)
                for t_, ys in enumerate(shifted(y, d_offs, 2)))
        # columns: out[b, c, p, q, i, j] = sum_d K[q, j, d] t[b, c, p, i, j + d]
        out = None
        for t_, ts in enumerate(shifted(t, d_offs, 4)):
            term = d_k3[:, :, t_].view(1, 1, 1, 8, 1, n) * ts.unsqueeze(3)
            out = term if out is None else out.add_(term)
        return out.reshape(b, 192, n, n)

    def idct(x):
        b = x.shape[0]
        xs = x.view(b, 3, 8, 8, n, n)  # b c p q i j
        # columns: t[b, c, p, i, e] = sum_q sum_d G[q, e, d] x[b, c, p, q, i, e + d]
        t = sum((i_k3[:, :, t_].view(1, 1, 1, 8, 1, n) * xsh).sum(3)
                for t_, xsh in enumerate(shifted(xs, i_offs, 5)))
        # rows: s[b, c, a, e] = sum_p sum_d G[p, a, d] t[b, c, p, a + d, e]
        s_ = sum((i_k3[:, :, t_].view(1, 1, 8, n, 1) * tsh).sum(2)
                 for t_, tsh in enumerate(shifted(t, i_offs, 3))) + 128
        img = torch.einsum("ck,bkhw->bchw", m_r, s_) + off_r.view(1, 3, 1, 1)
        return (img / 255).clamp(min=0.0, max=1.0)

    return dct, idct


def check_transforms(fast, ref, x):
    """Largest differences of the fast transforms from the reference's on faces ``x`` (and on a residue)."""
    with torch.no_grad():
        f_ref, f_fast = ref[0](x), fast[0](x)
        r = f_ref * torch.linspace(-0.5, 1.5, 192).view(1, 192, 1, 1)  # a residue-like input, all channels used
        out = {"dct_max_abs": float((f_ref - f_fast).abs().max()), "dct_scale": float(f_ref.abs().max()),
               "idct_max_abs": float((ref[1](f_ref) - fast[1](f_ref)).abs().max()),
               "idct_resid_max_abs": float((ref[1](r) - fast[1](r)).abs().max())}
    return out


def skip_unused_decodes(model):
    """Stage 2: ``obtain_residue`` without decoding ``x_encode`` / ``x_residue`` (never used there).

    In stage 2 the reference decodes both under ``no_grad`` and uses them only in ``MinusLoss``'s
    generative term, whose weight it sets to 0; the recogniser sees ``shuffle(x_residue_up)`` only.
    Returning zeros for them changes no gradient and no parameter (the logged ``loss_gen`` becomes
    the L1 of the face against -1, times 0); it saves two 896x896 decodes per face per step.
    """
    def obtain_residue(x):
        x_up = model.encoder(x)
        x_encode_up, x_latent = model.generator(x_up)
        x_residue_up = x_up - x_encode_up
        blank = torch.zeros_like(x) - 1
        return x_up, blank, blank, x_latent, x_encode_up, x_residue_up
    model.obtain_residue = obtain_residue


def build(R, stage, s, stage1_state=None):
    def recognizer():
        return R.get_model("IR_18")([112, 112])
    n_dup = int(s.get("n_duplicate", 1))
    if stage == "stage1":
        model = R.mf.MinusBackbone(mode="stage1", recognizer=recognizer())
        resize_unet(model.generator.backbone, s["generator_widths"])
        resize_ir(model.recognizer, s["ir_stem"], s["ir_widths"], s["embedding_size"], 192)
        return model
    # stage 2 (partialface base_task.make_model): the stage-1 generator, deep-copied, mode stage2
    pre = R.mf.MinusBackbone(mode="stage1", recognizer=recognizer())
    resize_unet(pre.generator.backbone, s["generator_widths"])
    resize_ir(pre.recognizer, s["ir_stem"], s["ir_widths"], s["embedding_size"], 192)
    # the generator only (a reference stage-1 state_dict, or ours exported by ref_minusface_demo.py)
    prefix = "model.generator."
    sd = {k[len(prefix):]: torch.from_numpy(v) for k, v in stage1_state.items() if k.startswith(prefix)}
    pre.generator.load_state_dict(sd)  # strict: every generator tensor, nothing else
    pre.generator.mode = "stage2"
    model = R.mf.MinusBackbone(mode="stage2", n_duplicate=n_dup, generator=copy.deepcopy(pre.generator),
                               recognizer=recognizer())
    resize_ir(model.recognizer, s["ir_stem"], s["ir_widths"], s["embedding_size"], 3 * n_dup)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tface", required=True)
    ap.add_argument("--torchjpeg", required=True)
    ap.add_argument("--stage", choices=("stage1", "stage2"), default="stage1")
    ap.add_argument("--batches", default="")
    ap.add_argument("--dump-init", default="", help="write the fresh stage-1 state_dict to this .npz and stop")
    ap.add_argument("--settings", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage1-state", default="", help="stage 2: a step_<n>.npz of the stage-1 run (its "
                    "model.generator.* tensors are used)")
    ap.add_argument("--resume-from", default="", metavar="OUT/step_<k>.npz",
                    help="continue a run of these settings from its step-k checkpoint (model, head; the SGD momentum "
                         "from optim_<k>.pt beside it where saved, else it restarts at zero); the batches file may "
                         "start at its step first_step")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reference-transforms", action="store_true",
                    help="keep the reference's own dct_transform / idct_transform (slow: ~100 s per stage-2 step "
                         "on a loaded 2-core CPU) instead of fast_transforms, and decode everything in stage 2")
    ap.add_argument("--make-golden-dir", default=SHARED_REF)
    a = ap.parse_args(argv)
    sys.path.insert(0, a.make_golden_dir)
    import make_golden as mg  # noqa: E402  (the reference's import shims)

    s = json.load(open(a.settings))
    torch.manual_seed(int(s.get("seed", 0)))
    torch.set_num_threads(a.threads or max(1, os.cpu_count() or 1))
    mg.patch_cuda()
    mg.init_single_process_group("gloo")
    R = mg.setup_reference(a.tface, a.torchjpeg, test_utils=False)

    if a.dump_init:  # the fresh stage-1 state_dict at the demo's sizes (key names and shapes), then stop
        s1 = build(R, "stage1", s)
        np.savez(a.dump_init, **{f"model.{k}": v.detach().numpy() for k, v in s1.state_dict().items()})
        return
    data = np.load(a.batches)
    images, labels = data["images"], data["labels"]
    first = int(data["first_step"]) if "first_step" in data.files else 0  # step of images[0]
    lrs = [float(v) for v in s["lrs"]]
    steps = len(lrs)
    start = 0
    if a.resume_from:
        name = os.path.basename(a.resume_from)
        if not (name.startswith("step_") and name.endswith(".npz") and name[5:-4].isdigit()):
            raise SystemExit(f"--resume-from {a.resume_from}: expected a step_<k>.npz this script saved")
        start = int(name[5:-4])
    if first > start or first + len(images) < steps:
        raise SystemExit(f"{a.batches}: batches of steps {first}..{first + len(images) - 1} for a run of steps "
                         f"{start}..{steps - 1}")
    stage1_state = dict(np.load(a.stage1_state)) if a.stage == "stage2" else None
    if a.stage == "stage2" and not a.stage1_state:
        raise SystemExit("--stage stage2 needs --stage1-state")
    model = build(R, a.stage, s, stage1_state)
    from tasks.partialface.utils import dct_transform, idct_transform
    check = {}
    if not a.reference_transforms:
        fast = fast_transforms(dct_transform, idct_transform)
        x0 = torch.from_numpy(np.transpose(images[0][:8].astype(np.float32) / 127.5 - 1.0, (0, 3, 1, 2)).copy())
        check = check_transforms(fast, (dct_transform, idct_transform), x0)
        print(json.dumps({"fast_transforms_check": check}), flush=True)
        idct_diff = max(check["idct_max_abs"], check["idct_resid_max_abs"])
        if check["dct_max_abs"] > 1e-4 * check["dct_scale"] or idct_diff > 1e-4:
            raise SystemExit(f"fast transforms differ from the reference's: {check}")
        model.encoder, model.decoder = fast
        if a.stage == "stage2":
            skip_unused_decodes(model)
    emb, nc = int(s["embedding_size"]), int(s["num_classes"])
    init_value = torch.FloatTensor(emb, nc)
    torch.nn.init.normal_(init_value, std=0.01)
    head = R.df_arcface.ArcFace(in_features=emb, gpu_index=0, weight_init=init_value,
                                class_split=R.utils.get_class_split(nc, 1), scale=float(s["scale"]),
                                margin=float(s["margin"]))
    mloss = R.mf.MinusLoss(mode=a.stage)
    if a.stage == "stage1":
        mult = float(s.get("generator_lr_mult", 1.0))
        groups = [{"params": list(model.generator.parameters()), "lr": lrs[0] * mult, "mult": mult},
                  {"params": list(model.recognizer.parameters()), "lr": lrs[0], "mult": 1.0}]
    else:
        groups = [{"params": list(model.recognizer.parameters()), "lr": lrs[0], "mult": 1.0}]
    bopt = torch.optim.SGD(groups, lr=lrs[0], momentum=s["momentum"], weight_decay=s["weight_decay"])
    hopt = torch.optim.SGD([{"params": head.parameters(), "mult": 1.0}], lr=lrs[0], momentum=s["momentum"],
                           weight_decay=s["weight_decay"])
    os.makedirs(a.out, exist_ok=True)
    save_steps = set(int(v) for v in s.get("save_steps", [steps]))
    save_steps.add(steps)
    wall0 = 0.0
    if start:
        sd = dict(np.load(a.resume_from))
        model.load_state_dict({k[len("model."):]: torch.from_numpy(v) for k, v in sd.items()
                               if k.startswith("model.")}, strict=True)
        with torch.no_grad():
            head.kernel.copy_(torch.from_numpy(sd["head.kernel"]))
        opt_path = os.path.join(os.path.dirname(a.resume_from), f"optim_{start}.pt")
        momentum = os.path.exists(opt_path)
        if momentum:
            o = torch.load(opt_path)
            bopt.load_state_dict(o["bopt"])
            hopt.load_state_dict(o["hopt"])
        prev = [json.loads(line) for line in open(os.path.join(a.out, "log.jsonl"))] \
            if os.path.exists(os.path.join(a.out, "log.jsonl")) else []
        prev = [r for r in prev if r["step"] <= start]
        wall0 = prev[-1]["wall_s"] if prev and prev[-1]["step"] == start else 0.0
        with open(os.path.join(a.out, "log.jsonl"), "w") as f:  # the steps after ``start`` are retrained
            f.writelines(json.dumps(r) + "\n" for r in prev)
        print(json.dumps({"resumed_from": a.resume_from, "step": start, "momentum": "restored" if momentum else
                          "zero (no optim_%d.pt)" % start, "wall_s_before": wall0}), flush=True)

    def save(step):
        sd = {f"model.{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()}
        sd["head.kernel"] = head.kernel.detach().numpy().copy()
        path = os.path.join(a.out, f"step_{step}.npz")
        np.savez(path + ".part.npz", **sd)
        torch.save({"bopt": bopt.state_dict(), "hopt": hopt.state_dict()},
                   os.path.join(a.out, f"optim_{step}.pt"))  # what --resume-from continues with
        os.replace(path + ".part.npz", path)  # readers never see a half-written file

    model.train()
    head.train()
    if a.stage == "stage2":
        model.generator.eval()
    log = open(os.path.join(a.out, "log.jsonl"), "a" if start else "w")
    t0 = time.time() - wall0
    for i in range(start, steps):
        for opt in (bopt, hopt):
            for g in opt.param_groups:
                g["lr"] = lrs[i] * g["mult"]
        x = torch.from_numpy(np.transpose(images[i - first].astype(np.float32) / 127.5 - 1.0, (0, 3, 1, 2)).copy())
        y = torch.from_numpy(labels[i - first].astype(np.int64))
        x_encode, x_residue, x_feature, x_latent = model(x)
        outputs, part_labels, original_outputs = head(x_feature, y)
        loss, loss_gen, loss_fr, _ = mloss(x, x_encode, x_latent, outputs, part_labels)
        bopt.zero_grad()
        hopt.zero_grad()
        loss.backward()
        bopt.step()
        hopt.step()
        acc = float((original_outputs.argmax(1) == y).float().mean())
        rec = {"step": i + 1, "loss": float(loss), "loss_gen": float(loss_gen), "loss_fr": float(loss_fr),
               "train_acc": acc, "lr": lrs[i], "wall_s": round(time.time() - t0, 2)}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if (i + 1) % 10 == 0 or i == 0:
            print(json.dumps(rec), flush=True)
        if i + 1 in save_steps:
            save(i + 1)
    print(json.dumps({"stage": a.stage, "steps": steps, "wall_s": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
