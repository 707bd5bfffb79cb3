"""ArcFace-FD: the same recogniser on all 192 DCT channels (the paper's frequency-domain baseline).

    python -m ppfr_jax.main --config configs/arcface_fd.py:ir50 --workdir runs/arcface_fd_ir50 \
        --config.data.source=tfrecord --config.data.path=/data/ms1m --config.data.index=/data/ms1m.txt
    python -m ppfr_jax.main --config configs/arcface_fd.py:demo --workdir runs/arcface_fd_demo

Variants as configs/arcface.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import arcface  # noqa: E402


def get_config(arg=None):
    arg = "fd" if not arg else arg + ",fd"
    return arcface.get_config(arg)
