"""DuetFace: client warm-up (``client``), then server training with the client frozen (``server``).

Paper setting (``ir18``, default, or ``ir50``), from the reference's
``tasks/duetface/train.yaml``: DCT channels split by ``SUB_CHS`` (30 client,
162 server); client MobileFaceNet (30 -> 64 input conv, 512-d); server IR on
the 162 channels with an interactive block after each stage; ArcFace s=64
m=0.5, batch 64 per device, SGD momentum 0.9, weight decay 5e-4, LR 0.1
divided by 10 at epochs 10, 18, 22 of 24, for each of the two runs. The ROI
comes from a frozen PFLD landmark detector (the reference's checkpoint,
``pfld=<path to .pth>``; ``roi=dataset`` reads landmarks stored in the
training records instead, ``roi=template`` uses a constant face hull)::

    python -m ppfr_jax.main --config configs/duetface.py:client,ir50 --workdir runs/duetface_client_ir50 \\
        --config.data.source=tfrecord --config.data.path=/data/ms1m --config.data.index=/data/ms1m.txt \\
        --config.eval.root=/data/bins  # lfw.bin, cfp_fp.bin, agedb_30.bin, calfw.bin, cplfw.bin
    python -m ppfr_jax.main --config configs/duetface.py:server,ir50,pfld=/ckpt/pfld.pth \\
        --workdir runs/duetface_server_ir50 \\
        --config.data.source=tfrecord --config.data.path=/data/ms1m --config.data.index=/data/ms1m.txt \\
        --config.eval.root=/data/bins  # lfw.bin, cfp_fp.bin, agedb_30.bin, calfw.bin, cplfw.bin

(the server run reads the client from ``runs/duetface_client_<size>`` unless
``client_workdir=...`` is given, and refuses to start without it).

MS1MV2 as insightface distributes it (``faces_emore/``: ``train.rec``, ``train.idx``, ``property``
and the ``.bin`` files; RecordIO records carry no landmarks, so the ROI comes from PFLD), verified
every ``eval.every_steps`` and at the end on the five benchmarks (``lfw.bin``, ``cfp_fp.bin``,
``agedb_30.bin``, ``calfw.bin``, ``cplfw.bin``, beside ``train.rec`` or under ``--config.eval.root``;
``eval/<name>/accuracy``, the best checkpoint by their mean), then IJB-B and IJB-C 1:1::

    python -m ppfr_jax.main --config configs/duetface.py:client,ir50 --workdir runs/duetface_client_ir50 \\
        --config.data.source=recordio --config.data.path=/data/faces_emore --config.eval.every_steps=2000
    python -m ppfr_jax.main --config configs/duetface.py:server,ir50,pfld=/ckpt/pfld.pth \\
        --workdir runs/duetface_server_ir50 \\
        --config.data.source=recordio --config.data.path=/data/faces_emore --config.eval.every_steps=2000
    ppfr-eval --model ppfr --checkpoint runs/duetface_server_ir50 --ijb /data/IJB_release --target IJBB \\
        --out runs/duetface_server_ir50/ijb
    ppfr-eval --model ppfr --checkpoint runs/duetface_server_ir50 --ijb /data/IJB_release --target IJBC \\
        --out runs/duetface_server_ir50/ijb

Expected (server, IR-50, MS1Mv2): LFW 99.82, CFP-FP 97.79, AgeDB 97.93 (SPEC section 5).

``demo``: tiny client and server on the embedded LFW demo set with its stored
landmarks (``data.landmarks=True``, ROI from the dataset; verification uses
the template ROI). The DCT input (and, for the server, the frozen client in its step) makes a step
2-8x the RGB demo's 0.6 s
(client ~1.2 s, server ~4.9 s per batch of 64 on 2 idle AMD EPYC cores; 0.6 s and 1.6 s on
2 AVX-512 Xeon cores; 0.31 s and 1.19 s there with the commands' CPU defaults, README), so the stages are short: client 8 epochs (336 steps), server 4 epochs
(168 steps). Measured on an idle 2-core EPYC: client 7 min -> DevTest 80.3%, server 14 min ->
85.2% (the RGB baseline with the server's budget, ``configs/arcface.py:demo,match=duetface``:
81.9%); the whole pipeline on the Xeon (2026-12-06, lightly loaded): client 3m51s -> 77.4%,
server 5m55s -> 84.6%, baseline 1m25s -> 83.4%, attack 3m35s, total 14m46s; with the commands' CPU defaults
(YNN dot/reduce flag, huge-page malloc), from a fresh clone with the README's first block, on the idle Xeon:
client 2m33s -> 82.0%, server 4m36s -> 86.3%, baseline 1m12s -> 83.5%, attack 3m00s, total 11m21s
(bench/RESULTS.md)::

    python -m ppfr_jax.main --config configs/duetface.py:client,demo --workdir runs/duetface_client_demo
    python -m ppfr_jax.main --config configs/duetface.py:server,demo --workdir runs/duetface_server_demo

``tiny``: synthetic data, template ROI, a few steps: for tests
(``configs/duetface.py:server,tiny,client_workdir=<dir>``).

No stage named (``configs/duetface.py:demo``, ``:tiny``): the whole pipeline in one run
(``ppfr_jax.pipeline``): client, then server (wired to the client's sub-folder), the RGB
baseline with the server's budget (``configs/arcface.py:demo,match=duetface``; ``baseline=False``
to skip it, ``baseline_workdir=DIR`` to read an existing one), the white-box recovery attack on what
the server receives (``configs/privacy.py:demo``, ``attack_steps=`` attacker steps) and
``<workdir>/report.md``::

    python -m ppfr_jax.main --config configs/duetface.py:demo --workdir runs/duetface_demo

Stage fields are under ``config.stages.client`` / ``config.stages.server`` (e.g.
``--config.stages.server.num_train_steps=50``), the attack's under ``config.privacy``.
"""
import pathlib

from ppfr_jax import config_lib
from ppfr_jax.frequency import SUB_CHS

SIZES = ("ir18", "ir50", "demo", "tiny")


def pipeline(a):
    """The whole DuetFace pipeline (``demo`` or ``tiny``) as one config (``config_lib.pipeline_config``)."""
    if not (a.demo or a.tiny) or a.ir18 or a.ir50 or a.steps or a.client_workdir or a.roi or a.pfld:
        raise ValueError("configs/duetface.py: the whole pipeline (no stage named) exists for 'demo' and 'tiny' only, "
                         "with baseline=, baseline_workdir=, attack_steps=; name a stage ('client' or 'server') "
                         "for the other settings")
    size = "tiny" if a.tiny else "demo"
    privacy, baseline = config_lib.pipeline_attack_and_baseline(pathlib.Path(__file__).parent, "duetface", size,
                                                                 a.attack_steps)
    return config_lib.pipeline_config(
        "duetface", {"client": get_config(f"client,{size}"), "server": get_config(f"server,{size}")},
        baseline_config=baseline, privacy_config=privacy, baseline=a.baseline, baseline_workdir=a.baseline_workdir,
        # 2-core Xeon, 2026-12-06 (bench/RESULTS.md): the whole pipeline's ETA scales these by the measured speed
        estimates_s={"client": 153, "server": 276, "baseline": 72, "privacy": 180} if size == "demo" else {},
        grid_rows=6 if size == "demo" else 3)


def get_config(arg=None):
    a = config_lib.parse_arg(arg, client=False, server=False, ir18=False, ir50=False, demo=False, tiny=False,
                             steps=0, client_workdir="", roi="", pfld="", baseline=True, baseline_workdir="",
                             attack_steps=0)
    if a.client and a.server:
        raise ValueError(f"configs/duetface.py: pick one stage, 'client' (warm-up) or 'server' (got {arg!r}), e.g. "
                         f"configs/duetface.py:client,demo then configs/duetface.py:server,demo, or none for the "
                         f"whole pipeline (configs/duetface.py:demo)")
    if not (a.client or a.server):
        return pipeline(a)
    if a.baseline_workdir or a.attack_steps or not a.baseline:
        raise ValueError("configs/duetface.py: baseline=, baseline_workdir=, attack_steps= belong to the whole "
                         "pipeline (no stage named)")
    if a.ir18 + a.ir50 + a.demo + a.tiny > 1:
        raise ValueError(f"configs/duetface.py: pick at most one of {SIZES} (got {arg!r})")
    size = "tiny" if a.tiny else "demo" if a.demo else "ir50" if a.ir50 else "ir18"
    small = size in ("demo", "tiny")

    c = config_lib.base_config()
    c.model.input = "dct"
    client_backbone = "mobilefacenet_tiny" if small else "mobilefacenet"
    client_embedding = 64 if small else 512
    client_workdir = a.client_workdir or ("" if size == "tiny" else f"runs/duetface_client_{size}")
    c.duetface = dict(
        sub_channels=SUB_CHS,
        client_backbone=client_backbone,
        client_embedding_size=client_embedding,
        client_workdir=client_workdir,  # server: the warm-up run whose client is frozen
        client_step=0,  # 0 = its latest checkpoint
        client_command=f"python -m ppfr_jax.main --config configs/duetface.py:client,{size} "
                       f"--workdir {client_workdir or 'runs/duetface_client_' + size}",
        roi_source=a.roi or ("template" if size == "tiny" else "dataset" if size == "demo" else "pfld"),
        eval_roi_source="",  # '' = roi_source, or 'template' when that is 'dataset' (eval sets carry none)
        pfld_checkpoint=a.pfld,  # roi_source='pfld': reference .pth or a `ppfr-import --model pfld` dir
    )
    if a.client:
        c.task = "duetface_client"
        c.model.backbone = client_backbone
        c.model.embedding_size = client_embedding
    else:
        c.task = "duetface"
        c.model.backbone = "ir50" if a.ir50 else "ir_tiny" if small else "ir18"

    if small:
        c.data.source = "demo"
        c.data.landmarks = True
        c.model.dropout = 0.0
        if a.server:
            c.model.embedding_size = 128
        c.batch_size_per_device = 0
        c.batch_size = 64
        # a 162/192-channel 112x112 input costs ~3x the RGB demo per step: fewer epochs
        c.num_epochs = 8.0 if a.client else 4.0
        c.optim.boundaries_epochs = (5, 7) if a.client else (3,)
        c.optim.warmup_epochs = 0.5
        c.head.scale = 32.0
        c.head.margin = 0.3
        c.log_every_steps = 20
        c.checkpoint_every_steps = 100
        c.eval.every_steps = 0  # verification at the end only
    else:  # the papers' five benchmarks under eval.root (or beside a RecordIO pack's train.rec)
        config_lib.use_paper_benchmarks(c)
    if size == "tiny":  # seconds, for tests
        c.data.source = "synthetic"
        c.data.landmarks = False
        c.data.num_classes = 10
        c.model.embedding_size = 32
        c.duetface.client_embedding_size = 32
        c.batch_size = 8
        c.num_train_steps = 2
        c.eval.pairs = ""
        c.log_every_steps = 1
        c.checkpoint_every_steps = 2
    if a.steps:
        c.num_train_steps = a.steps
    return c
