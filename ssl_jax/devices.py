"""Where arrays live: a 1-D data-parallel mesh, replicated state, sharded batches, peak memory.

The mesh spans every process's devices (`jax.devices()`, ordered by process), so in a
multi-process run (`ssl_jax.distributed`) each process holds a contiguous block of each
batch's rows: `process_rows` says which, and `global_arrays` assembles the global batch from
each process's own rows.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over every process's devices (one device: the same code path)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
    """Parameters, optimizer and algorithm state live whole on every device.

    Across processes each process puts its own (identical) copy on its devices.
    """
    if not mesh.is_multi_process:
        return jax.device_put(tree, replicated(mesh))
    return jax.device_put(jax.tree.map(np.asarray, tree), replicated(mesh))


def process_rows(mesh: Mesh, rows: int) -> slice:
    """The rows of a `rows`-row batch that this process's devices hold (all of them in a
    single-process run): the mesh lists devices by process, so they are one contiguous block."""
    n = mesh.devices.size
    if rows % n:
        raise ValueError(
            f"A batch of {rows} rows cannot be split over the {n} devices; choose "
            f"data.batch_size (and data.mu * data.batch_size) divisible by {n}."
        )
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if mine != list(range(mine[0], mine[-1] + 1)):
        raise ValueError(f"This process's devices are not contiguous in the mesh: {mine}.")
    per_device = rows // n
    return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)


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


def global_arrays(local: dict, mesh: Mesh, spec: PartitionSpec, global_rows: dict, axis: int):
    """Global arrays from each process's own rows (axis `axis`) of every entry of `local`;
    `global_rows[key]` is the row count of the whole batch. Single-process: `local` is whole."""
    sharding = NamedSharding(mesh, spec)
    if not mesh.is_multi_process:
        return jax.device_put(dict(local), sharding)
    out = {}
    for key, value in local.items():
        shape = list(np.shape(value))
        shape[axis] = int(global_rows[key])
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value), tuple(shape))
    return out


def peak_device_memory_bytes() -> int | None:
    """Peak bytes in use on the first local device; None where the backend does not say (CPU)."""
    stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None
