"""ArcFace baseline on RGB faces (the paper's "RGB" row).

Paper setting (``ir50``/``ir18``): IR backbone, ArcFace s=64 m=0.5, 512-d,
batch 64 per device, SGD momentum 0.9, weight decay 5e-4 (not on BN/PReLU/bias),
LR 0.1 divided by 10 at epochs 10, 18, 22 of 24. Point ``data`` at a TFace
tfrecord set (e.g. MS1Mv2):

    python -m ppfr_jax.main --config configs/arcface.py:ir50 --workdir runs/arcface_ir50 \\
        --config.data.source=tfrecord --config.data.path=/data/ms1m --config.data.index=/data/ms1m.txt \\
        --config.eval.root=/data/bins  # lfw.bin, cfp_fp.bin, agedb_30.bin, calfw.bin, cplfw.bin

MS1MV2 as insightface distributes it (``faces_emore/``: ``train.rec``, ``train.idx``, ``property``
and the verification ``.bin`` files), read without mxnet; every ``eval.every_steps`` and at the end
the run verifies on the papers' five benchmarks (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``,
``calfw.bin``, ``cplfw.bin``; found beside ``train.rec``, or under ``--config.eval.root=DIR``), logs
``eval/<name>/accuracy`` and keeps the best checkpoint by their mean; then IJB-C 1:1 on the release
layout (``IJB_release/IJBC/meta``, ``loose_crop``)::

    python -m ppfr_jax.main --config configs/arcface.py:ir50 --workdir runs/arcface_ir50 \\
        --config.data.source=recordio --config.data.path=/data/faces_emore --config.eval.every_steps=2000
    ppfr-eval --model ppfr --checkpoint runs/arcface_ir50 --ijb /data/IJB_release --target IJBC \\
        --out runs/arcface_ir50/ijbc

A pack without ``calfw.bin`` / ``cplfw.bin`` (the older faces_emore): name the ones it has,
``--config.eval.sets='("lfw.bin", "cfp_fp.bin", "agedb_30.bin")'``.

Millions of identities (Glint360K, WebFace42M: the same RecordIO layout): PartialFC v2 sampling
and the class-chunked softmax keep the class-sharded head small (10M identities on 64 devices:
1.19 GiB per device for the head; bench/RESULTS.md, "Class-chunked softmax")::

    python -m ppfr_jax.main --config configs/arcface.py:ir50 --workdir runs/arcface_glint \
        --config.data.source=recordio --config.data.path=/data/glint360k \
        --config.head.sample_rate=0.1 --config.head.class_chunk=4096 \
        --config.eval.root=/data/bins  # if the pack lacks the five .bin files

Expected (IR-50, MS1Mv2, 8 GPUs): LFW 99.77, CFP-FP 98.30, AgeDB 97.88 (SPEC section 5).

``demo``: a tiny IR on the embedded LFW demo set, about 10 minutes on a
2-core CPU; prints the DevTest verification accuracy (see bench/RESULTS.md):

    python -m ppfr_jax.main --config configs/arcface.py:demo --workdir runs/arcface_demo

``match=duetface`` / ``match=minusface`` (with ``demo``): the RGB baseline with
the training budget of that method's recogniser, i.e. the batch size, epochs
and LR schedule copied from ``configs/duetface.py:server,demo`` or
``configs/minusface.py:stage2,demo`` (same backbone, head and LR already), for
the equal-budget rows of bench/RESULTS.md:

    python -m ppfr_jax.main --config configs/arcface.py:demo,match=duetface --workdir runs/arcface_demo_duetface
"""
import pathlib

from ppfr_jax import config_lib

MATCH = {"duetface": ("duetface.py", "server,demo"), "minusface": ("minusface.py", "stage2,demo")}


def get_config(arg=None):
    a = config_lib.parse_arg(arg, ir18=False, ir50=False, ir100=False, mobilefacenet=False, demo=False, tiny=False,
                             steps=0, fd=False, match="")
    c = config_lib.base_config()
    c.task = "arcface"
    c.model.input = "dct" if a.fd else "rgb"
    c.model.backbone = "ir50" if a.ir50 else "ir100" if a.ir100 else "mobilefacenet" if a.mobilefacenet else "ir18"
    if a.demo or a.tiny:
        c.data.source = "demo"
        c.model.backbone = "ir_tiny"
        c.model.embedding_size = 128
        c.model.dropout = 0.0
        c.batch_size_per_device = 0
        c.batch_size = 64
        c.num_epochs = 20.0
        c.optim.boundaries_epochs = (12, 17)
        c.optim.warmup_epochs = 1.0
        c.head.scale = 32.0
        c.head.margin = 0.3
        c.log_every_steps = 20
        c.checkpoint_every_steps = 200
        c.eval.every_steps = 200
    else:  # the papers' five benchmarks under eval.root (or beside a RecordIO pack's train.rec)
        config_lib.use_paper_benchmarks(c)
    if a.match:
        if a.match not in MATCH or not a.demo:
            raise ValueError(f"configs/arcface.py: match={a.match!r} needs 'demo' and one of {sorted(MATCH)}")
        file, variant = MATCH[a.match]
        other = config_lib.load_config_spec(f"{pathlib.Path(__file__).with_name(file)}:{variant}")
        c.batch_size = other.batch_size
        c.num_epochs = other.num_epochs
        c.optim = other.optim
        c.head = other.head
        for k in ("backbone", "embedding_size", "dropout"):
            c.model[k] = other.model[k]
    if a.tiny:  # seconds, for tests
        c.data.source = "synthetic"
        c.data.num_classes = 10
        c.batch_size = 8
        c.num_train_steps = 4
        c.eval.pairs = ""
        c.log_every_steps = 2
        c.checkpoint_every_steps = 2
    if a.steps:
        c.num_train_steps = a.steps
    return c
