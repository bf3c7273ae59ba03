"""Where arrays live: a 1-D data-parallel mesh, replicated state, sharded batches, peak memory."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over the local devices (one device: the same code path)."""
    devices = jax.local_devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
    """Parameters, optimizer and algorithm state live whole on every device."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(batch, mesh: Mesh):
    """Splits every batch array along its first axis over the mesh's devices.

    The losses are global over the batch (graph contrastive, triplet mining, memory bank,
    BatchNorm statistics): under jit XLA inserts the collectives, so the sharded step
    computes the single-device function up to float reassociation.
    """
    n = mesh.devices.size
    for key, value in batch.items():
        if np.shape(value)[0] % n:
            raise ValueError(
                f"Batch entry {key!r} has {np.shape(value)[0]} rows, not divisible "
                f"by the {n} devices; choose data.batch_size divisible by {n}."
            )
    return jax.device_put(dict(batch), NamedSharding(mesh, PartitionSpec("data")))


def peak_device_memory_bytes() -> int | None:
    """Peak bytes in use on the first local device; None where the backend does not say (CPU)."""
    stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None
