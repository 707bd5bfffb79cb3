"""Mesh and shardings: one code path for 1 CPU, N GPUs and TPU pod slices.

The mesh has axes ``data`` x ``model`` over every device. The backbone is
data-parallel (batch sharded on ``data``); the classification head's class axis
is sharded over all devices (the reference's "dist FC"), padded to a multiple of
``lcm(CLASS_PAD, devices)`` so that checkpoints restore across meshes.
Multi-host: :func:`maybe_initialize_distributed` calls
``jax.distributed.initialize()`` when the launcher says there are several
processes; each host feeds its slice of the global batch
(:func:`make_global_batch`).
"""
from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

CLASS_PAD = 128  # head width is a multiple of this (and of the device count): restores across meshes


def maybe_initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when the launcher says we are one of several processes."""
    env = os.environ
    multi = (env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS")
             or int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
             or int(env.get("JAX_NUM_PROCESSES", "1")) > 1)
    if multi and not jax.distributed.is_initialized():
        kw = {}
        if env.get("JAX_COORDINATOR_ADDRESS"):
            kw = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
        jax.distributed.initialize(**kw)



def create_mesh(config) -> Mesh:
    devices = np.asarray(jax.devices())
    model = max(int(config.mesh.get("model", 1)), 1)
    if devices.size % model:
        raise ValueError(f"config.mesh.model: {model} does not divide the {devices.size} devices")
    return Mesh(devices.reshape(devices.size // model, model), ("data", "model"))


def padded_num_classes(num_classes: int, num_devices: int) -> int:
    mult = math.lcm(CLASS_PAD, num_devices)
    return -(-num_classes // mult) * mult


CLASS_AXES = ("data", "model")  # the mesh axes a head kernel's class axis is sharded over


def class_shard_count(mesh: Mesh | None = None) -> int:
    """How many shards a head kernel's class axis is split into (PartialFC samples per shard).

    The product of the ``CLASS_AXES`` sizes of ``mesh``; without one, of the mesh
    ``create_mesh`` builds, which spans every device (``jax.device_count()``).
    """
    if mesh is None:
        return jax.device_count()
    return int(np.prod([mesh.shape[a] for a in CLASS_AXES]))


def state_shardings(abstract_state, mesh: Mesh):
    """Head kernels (and their optimiser traces) sharded by class; everything else replicated."""
    def rule(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if "head" in names and names and names[-1] == "kernel" and getattr(leaf, "ndim", 0) == 2:
            return NamedSharding(mesh, P(None, CLASS_AXES))
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(rule, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def make_global_batch(local: dict, mesh: Mesh) -> dict:
    """Per-host numpy batch -> global ``jax.Array``s sharded on the data axis."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in local.items()}


def global_batch_size(config, mesh) -> int:
    gb = int(config.batch_size) if config.get("batch_size", 0) else int(config.batch_size_per_device) * mesh.size
    if gb % mesh.devices.shape[0] or gb % jax.process_count():
        raise ValueError(f"config.batch_size: global batch {gb} is not divisible by the {mesh.devices.shape[0]} "
                         f"data-parallel devices / {jax.process_count()} processes")
    return gb
