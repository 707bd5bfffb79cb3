"""ArcFace-FD: the same recogniser on all 192 DCT channels (the paper's frequency-domain baseline).

    python -m ppfr_jax.main --config configs/arcface_fd.py:ir50 --workdir runs/arcface_fd_ir50 \
        --config.data.source=tfrecord --config.data.path=/data/ms1m --config.data.index=/data/ms1m.txt
    python -m ppfr_jax.main --config configs/arcface_fd.py:demo --workdir runs/arcface_fd_demo

Variants as configs/arcface.py (read through ``config_lib.load_config_spec``, no ``sys.path`` edit).
"""
import pathlib

from ppfr_jax import config_lib

ARCFACE = str(pathlib.Path(__file__).with_name("arcface.py"))


def get_config(arg=None):
    return config_lib.load_config_spec(f"{ARCFACE}:{arg + ',fd' if arg else 'fd'}")
