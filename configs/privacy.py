"""Privacy evaluation (``ppfr_jax/privacy/``): visual metrics and a white-box recovery attack per method.

Rows: no protection, DuetFace (the server's view), MinusFace ``X_p`` (fresh
shuffle per image), MinusFace with one fixed shuffle θ (attacker evaluated on
that θ and on fresh ones). The attacker is a U-Net trained with L1 from the
protected representation to the face on the training identities, evaluated on
held-out ones; an independent recogniser then verifies the recovered faces.

Paper setting (default): full-scale U-Net (64-128-256-512-1024), Adam 1e-4,
batch 32, 20k steps per attacker, on your training set (``--config.data.*``
as in the training configs), LFW DevTest or any ``.bin`` as held-out set::

    ppfr-privacy --config configs/privacy.py:duetface_workdir=runs/duetface_server_ir50,\\
    minusface_workdir=runs/minusface_s1_ir50,recognizer=/ckpt/068.ckpt --workdir runs/privacy_ir50 \\
        --config.data.source=tfrecord --config.data.path=/data/ms1m --config.data.index=/data/ms1m.txt

The MinusFace paper reports, for this attack, SSIM / PSNR of DuetFace 0.84 /
19.39 dB and MinusFace 0.50 / 10.98 dB (SPEC section 5).

``demo``: the embedded LFW demo set (attacker trained on its 115 training
identities, evaluated on the 1,549 DevTest faces), a small U-Net
(8-16-32-64-128), Adam 3e-3, 300 steps of 16 per attacker, reading the demo runs of
``configs/duetface.py:server,demo`` and ``configs/minusface.py:stage1,demo``
(defaults ``runs/duetface_server_demo``, ``runs/minusface_stage1_demo``; a
row whose run is missing is skipped with the command that makes it). With
the CASIA MobileFaceNet of ``../shared/data/models`` as recogniser::

    ppfr-privacy --workdir runs/privacy_demo --config \\
        configs/privacy.py:demo,recognizer=../shared/data/models/mobilefacenet_casia_xiaoccer/068.ckpt

(``full``: the paper's full-scale U-Net instead; slow on a CPU.) ``tiny``:
synthetic training faces, a tiny U-Net, 2 steps, 10 DevTest pairs, untrained
method weights allowed: for tests. Variant arguments: ``duetface_workdir=``,
``minusface_workdir=``, ``recognizer=`` (checkpoint), ``recognizer_model=``
(an ``evaluate.MODELS`` name, default ``casia_mobilefacenet``), ``steps=``,
``allow_untrained=True``, ``rows=raw+minusface`` (``+``-separated subset).

``demo`` measured 2026-12-08 on a 2-core AMD EPYC (bench/RESULTS.md, "All three rows on models of today's demo
commands"; 846 s), DuetFace's server from ``configs/duetface.py:demo``, MinusFace's generator from
``configs/minusface.py:stage1,demo``: recovered SSIM / CASIA accuracy on the recovered faces raw 0.956 /
98.4%, DuetFace 0.722 / 93.0%, MinusFace 0.374 / 51.8% (chance); no attacker collapses to one face.
"""
import ml_collections

from ppfr_jax import config_lib
from ppfr_jax.frequency import SUB_CHS
from ppfr_jax.models.unet import DEFAULT_WIDTHS

DEMO_WIDTHS = (8, 16, 32, 64, 128)
TINY_WIDTHS = (4, 8)  # one pooling level: compiles in seconds
ROWS = ("raw", "duetface", "minusface", "minusface_fixed_theta")


def get_config(arg=None):
    a = config_lib.parse_arg(arg, demo=False, tiny=False, full=False, steps=0, duetface_workdir="",
                             minusface_workdir="", recognizer="", recognizer_model="casia_mobilefacenet",
                             allow_untrained=False, rows="")
    if a.demo and a.tiny:
        raise ValueError(f"configs/privacy.py: pick one of demo, tiny (got {arg!r})")
    small = a.demo or a.tiny

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.rows = tuple(a.rows.split("+")) if a.rows else ROWS
    c.allow_untrained = a.allow_untrained  # untrained stand-ins for missing checkpoints (tests only)
    c.data = config_lib.base_config().data  # the attacker's training faces (training identities)
    c.eval = ml_collections.ConfigDict(dict(pairs="demo", max_pairs=0, batch_size=64))
    c.attacker = ml_collections.ConfigDict(dict(
        widths=DEFAULT_WIDTHS, remat=False, steps=20000, batch_size=32, lr=1e-4, warmup_steps=500,
        log_every_steps=500))
    c.duetface = ml_collections.ConfigDict(dict(
        workdir=a.duetface_workdir,  # a DuetFace *server* run (holds the frozen client + attention convs)
        step=0,  # 0 = latest checkpoint
        attacker_input="channels",  # 'channels' (162 DCT channels) or 'decoded' (their RGB decode)
        # architecture, used when the run has no results.json to read it from
        backbone="ir18", client_backbone="mobilefacenet", client_embedding_size=512, sub_channels=SUB_CHS,
        command="python -m ppfr_jax.main --config configs/duetface.py:server --workdir runs/duetface_server_ir18"))
    c.minusface = ml_collections.ConfigDict(dict(
        workdir=a.minusface_workdir,  # a MinusFace stage-1 (or stage-2) run: its generator
        step=0,
        generator_widths=DEFAULT_WIDTHS,  # used when the run has no results.json
        fixed_theta_seed=1234,  # the fixed-key row's permutation
        command="python -m ppfr_jax.main --config configs/minusface.py:stage1 --workdir runs/minusface_stage1_ir18"))
    c.recognizer = ml_collections.ConfigDict(dict(model=a.recognizer_model, checkpoint=a.recognizer))
    c.grid_rows = 6

    if small:
        c.data.source = "demo"
        c.attacker.widths = DEFAULT_WIDTHS if a.full else DEMO_WIDTHS
        c.attacker.steps = 300
        c.attacker.batch_size = 16
        # measured on the demo: 1e-3 leaves the small U-Net near the mean face after 300 steps; 1e-2 made the
        # MinusFace attacker output one constant face (50.00% ± 0); 3e-3 does not (bench/RESULTS.md, 2026-11-30)
        c.attacker.lr = 3e-3
        c.attacker.warmup_steps = 20
        c.attacker.log_every_steps = 50
        c.duetface.update(backbone="ir_tiny", client_backbone="mobilefacenet_tiny", client_embedding_size=64,
                          workdir=a.duetface_workdir or "runs/duetface_server_demo",
                          command="python -m ppfr_jax.main --config configs/duetface.py:client,demo --workdir "
                                  "runs/duetface_client_demo && python -m ppfr_jax.main --config "
                                  "configs/duetface.py:server,demo --workdir runs/duetface_server_demo")
        c.minusface.update(generator_widths=(4, 8, 16, 32, 64),
                           workdir=a.minusface_workdir or "runs/minusface_stage1_demo",
                           command="python -m ppfr_jax.main --config configs/minusface.py:stage1,demo "
                                   "--workdir runs/minusface_stage1_demo")
    if a.tiny:  # seconds, for tests
        c.data.source = "synthetic"
        c.data.num_classes = 10
        c.allow_untrained = True  # no checkpoints in tests
        c.duetface.workdir = a.duetface_workdir
        c.minusface.workdir = a.minusface_workdir
        c.minusface.generator_widths = TINY_WIDTHS
        c.attacker.widths = TINY_WIDTHS
        c.attacker.steps = 2
        c.attacker.batch_size = 4
        c.attacker.warmup_steps = 1
        c.attacker.log_every_steps = 1
        c.eval.max_pairs = 10
        c.eval.batch_size = 8
        c.grid_rows = 3
    if a.steps:
        c.attacker.steps = a.steps
    return c
