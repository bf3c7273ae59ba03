"""The per-step training batch (docs/method.md#batches) as a grain pipeline, and the test batches.

Two sample streams run side by side: the labelled stream draws batch B from the labelled set,
the unlabelled stream batch mu*B from the unlabelled set; each walks a fresh seeded permutation
per pass, drops the incomplete last batch and never ends (a set smaller than its batch is tiled
first, so every pass fills at least one batch; the reference instead repeated a too-small
labelled list ceil(B * eval_step / n) times — the same kind of with-replacement-across-copies
draw). The batch at step k is a pure function of (seed, k):

    pass, slot = divmod(k, n // batch)           permutation = default_rng([seed, stream, pass])
    augmentation draws of example j of view v = default_rng([seed, host_stream[v], k, j])

(the stream ids are declared in `views.py`), so any step can be produced alone: the grain
pipeline is just `range(start_step, total_steps)` mapped through `BatchMaker`, which makes a
resumed run (from `start_step` or from a grain iterator state) bit-identical to an
uninterrupted one, and multiprocess prefetch (each worker takes every W-th step) identical to
in-process. Every view is cropped to `config.data.crop_size`.

Worker processes (`config.data.workers` != 0) end with the training process, however it ends:
each watches its parent through the pipe multiprocessing gives it and exits when the parent is
gone (SIGKILL of the parent alone included), but never halfway through making a
shared-memory block; it ignores SIGINT and SIGTERM sent to the whole process group, so the
parent decides when to stop (a SIGTERM handler can finish its step and checkpoint first).
Once the workers are gone, multiprocessing's resource tracker unlinks any shared-memory block
still registered. At a normal exit, open iterators are closed and grain's
pending shared-memory deletions drained before multiprocessing shuts down, so no
"leaked shared_memory objects" warning appears.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from multiprocessing import shared_memory
from multiprocessing import util as mp_util

import grain
import numpy as np

from ssl_jax.data import augment_host
from ssl_jax.data.augment_spec import CROP_SIZE, DEFAULT_PARAMS, AugmentParams
from ssl_jax.data.sources import ImageSet
from ssl_jax.data.views import INDEX_KEYS, LABELLED, SAMPLE_STREAMS, UNLABELLED_VIEWS, VIEWS

MODES = ("host", "indices")


@functools.lru_cache(maxsize=8)
def _pass_permutation(seed: int, stream: int, pass_index: int, pool_size: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, pass_index]).permutation(pool_size)


def stream_indices(n: int, batch_size: int, *, seed: int, stream: int, step: int) -> np.ndarray:
    """Indices (into a set of n) of the batch at `step` of one infinite drop-last sampler."""
    if n <= 0:
        raise ValueError("cannot sample from an empty set")
    copies = -(-batch_size // n)  # tile a set smaller than one batch
    pool_size = n * copies
    steps_per_pass = pool_size // batch_size
    pass_index, slot = divmod(step, steps_per_pass)
    permutation = _pass_permutation(seed, stream, pass_index, pool_size)
    return permutation[slot * batch_size : (slot + 1) * batch_size] % n


def _view_rng(seed: int, view: str, step: int, position: int) -> np.random.Generator:
    return np.random.default_rng([seed, VIEWS[view].host_stream, step, position])


class BatchMaker:
    """step -> the numpy batch dict of that step; picklable, so grain workers can run it."""

    def __init__(
        self,
        labelled: ImageSet,
        unlabelled: ImageSet,
        *,
        seed: int,
        batch_size: int,
        mu: int,
        views: Sequence[str],
        mode: str = "host",
        params: AugmentParams = DEFAULT_PARAMS,
        part: tuple[int, int] | None = None,
    ):
        unknown = [v for v in views if v not in UNLABELLED_VIEWS]
        if unknown:
            raise ValueError(f"unknown unlabelled views {unknown}; known: {UNLABELLED_VIEWS}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if seed < 0:
            raise ValueError(f"config.seed must be >= 0 for the data streams, got {seed}")
        self.labelled_images = labelled.images
        self.labelled_labels = np.asarray(labelled.labels, np.int32)
        self.unlabelled_images = unlabelled.images
        self.unlabelled_labels = np.asarray(unlabelled.labels, np.int32)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.unlabelled_batch_size = int(mu) * int(batch_size)
        self.views = tuple(views)
        self.mode = mode
        # (p, P): make only part p of P equal contiguous row blocks of every array (the rows
        # of process p of a P-process run); each example keeps the draws of its global row.
        self.part = None if part is None or tuple(part) == (0, 1) else tuple(map(int, part))
        if self.part is not None:
            index, count = self.part
            for name, rows in (
                ("batch_size", self.batch_size),
                ("mu * batch_size", self.unlabelled_batch_size),
            ):
                if rows % count:
                    raise ValueError(
                        f"data.{name}={rows} cannot be split over {count} processes; choose "
                        f"a multiple of {count}."
                    )
        self.view_fns = {v: augment_host.view_fn(v, params) for v in (LABELLED, *self.views)}
        if len(self.labelled_images) == 0:
            raise ValueError("the labelled set is empty")
        if self.views and len(self.unlabelled_images) == 0:
            raise ValueError("the unlabelled set is empty")

    def _augment(
        self, view: str, images, indices: np.ndarray, step: int, first: int = 0
    ) -> np.ndarray:
        fn = self.view_fns[view]
        out = [
            fn(images[i], _view_rng(self.seed, view, step, first + j))
            for j, i in enumerate(indices)
        ]
        return np.stack(out).astype(np.uint8, copy=False)

    def _my_rows(self, rows: int) -> slice:
        if self.part is None:
            return slice(0, rows)
        index, count = self.part
        size = rows // count
        return slice(index * size, (index + 1) * size)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        step = int(step)
        x_index = stream_indices(
            len(self.labelled_images),
            self.batch_size,
            seed=self.seed,
            stream=SAMPLE_STREAMS["labelled"],
            step=step,
        )
        rows = self._my_rows(len(x_index))
        x_index = x_index[rows]
        batch = {
            "y": self.labelled_labels[x_index],
            INDEX_KEYS["labelled"]: x_index.astype(np.int32),
        }
        if self.mode == "host":
            batch[LABELLED] = self._augment(
                LABELLED, self.labelled_images, x_index, step, rows.start
            )
        if self.views:
            u_index = stream_indices(
                len(self.unlabelled_images),
                self.unlabelled_batch_size,
                seed=self.seed,
                stream=SAMPLE_STREAMS["unlabelled"],
                step=step,
            )
            rows = self._my_rows(len(u_index))
            u_index = u_index[rows]
            batch["u_y"] = self.unlabelled_labels[u_index]
            batch[INDEX_KEYS["unlabelled"]] = u_index.astype(np.int32)
            if self.mode == "host":
                for view in self.views:
                    batch[view] = self._augment(
                        view, self.unlabelled_images, u_index, step, rows.start
                    )
        return batch


def _ensure_flags_parsed() -> None:
    """grain's multiprocessing reads absl flags; outside `app.run` (tests, notebooks): defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


_block_creation = threading.Lock()


class _ExitSafeSharedMemory(shared_memory.SharedMemory):
    """A shared-memory block made whole or not at all before a worker's exit.

    `SharedMemory(create=True)` makes the segment, maps it, then registers it with the
    resource tracker; a worker that exited in between (its parent killed) would leave a
    segment nothing unlinks. The exit path takes the same lock, so it waits for the block.
    """

    def __init__(self, *args, **kwargs):
        with _block_creation:
            super().__init__(*args, **kwargs)

    def __reduce__(self):  # other processes open it as a plain block
        return shared_memory.SharedMemory, (self.name, False, self.size)


def _exit_when_parent_ends(parent_pid: int, worker_index: int, worker_count: int) -> None:
    """grain `worker_init_fn`: the worker ends when the training process ends, however it ends.

    Not `prctl(PR_SET_PDEATHSIG)`: that fires when the *thread* that started the worker exits,
    and grain starts its workers from a prefetch thread that ends on `close()` (before the
    worker is asked to stop, so it would die mid-batch and leak shared memory) and on
    `set_state()` (killing workers that are still needed). The pipe multiprocessing keeps from
    the parent *process* to each spawned child closes only when the parent process exits (or
    drops the worker), so a watcher thread blocked on it ends the worker at once, for SIGKILL of
    the parent alone too.
    """
    del worker_index, worker_count
    # A group-wide SIGINT/SIGTERM (Ctrl-C, a scheduler's preemption) is the parent's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid == parent_pid:
        if not parent.is_alive():
            os._exit(0)
        wait = parent.join
    else:  # not started by multiprocessing's spawn: poll the parent pid instead

        def wait():
            while os.getppid() == parent_pid:
                time.sleep(0.2)

    shared_memory.SharedMemory = _ExitSafeSharedMemory  # this worker's blocks (grain's too)

    def exit_after_parent():
        wait()
        # Not while a block is half made (created but not yet registered with the resource
        # tracker, which unlinks every registered block once the run's processes are gone).
        _block_creation.acquire(timeout=10)
        os._exit(0)

    threading.Thread(target=exit_after_parent, name="exit-with-parent", daemon=True).start()


_open_iterators: weakref.WeakSet = weakref.WeakSet()
_exit_hook_registered = False


def _drain_shared_memory_deletions(timeout: float = 10.0) -> None:
    """Waits for grain's background unlinking of freed shared-memory batches (a 1-thread pool)."""
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:  # another grain layout: nothing to drain
        return
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is None:
        return
    try:
        pool.apply_async(int).wait(timeout)  # FIFO: done once every earlier unlink is done
    except ValueError:  # the pool has been terminated
        pass


def _close_open_iterators() -> None:
    """At exit, before multiprocessing stops grain's deletion pool (exit priority 15).

    Closes the iterators, frees the batches nothing can use any more (those in reference
    cycles, and those held by the frames of an uncaught exception, whose traceback has already
    been printed), waits for their unlinking, and unlinks the names of any batch still alive
    (its memory stays mapped until exit).
    """
    import gc
    import sys

    for iterator in list(_open_iterators):
        iterator.close()
    sys.last_type = sys.last_value = sys.last_traceback = None
    if hasattr(sys, "last_exc"):
        sys.last_exc = None
    gc.collect()
    _drain_shared_memory_deletions()
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:
        return
    for obj in gc.get_objects():
        if isinstance(obj, SharedMemoryArray) and getattr(obj, "_unlink_on_del", False):
            obj._unlink_on_del = False
            try:
                obj.shm.unlink()
            except (AttributeError, OSError):
                pass


def _register_for_exit(iterator) -> None:
    global _exit_hook_registered
    _open_iterators.add(iterator)
    if not _exit_hook_registered:
        mp_util.Finalize(None, _close_open_iterators, exitpriority=100)
        _exit_hook_registered = True


def num_workers(setting: int) -> int:
    """`config.data.workers`: -1 = one per CPU core, 0 = in-process."""
    return (os.cpu_count() or 1) if setting == -1 else int(setting)


def train_iterator(
    data,
    config,
    *,
    views: Sequence[str],
    start_step: int = 0,
    mode: str = "host",
    part: tuple[int, int] | None = None,
) -> grain.DatasetIterator:
    """The training batches of steps start_step .. total_steps-1, as a checkpointable iterator.

    Resume either by building with `start_step=step`, or by building with the same
    `start_step` as the saved run and calling `set_state` with the saved grain state (grain's
    position is counted from `start_step`). Both give the batches an uninterrupted run would.
    `mode="indices"` makes the same batches without images (for device augmentation).
    `part=(p, P)`: only process p's rows of each batch (`BatchMaker`), as in a P-process run.
    Call `close()` when done to stop the worker processes (done at exit otherwise).
    """
    maker = BatchMaker(
        data.labelled,
        data.unlabelled,
        seed=int(config.seed),
        batch_size=int(config.data.batch_size),
        mu=int(config.data.mu),
        views=views,
        mode=mode,
        params=AugmentParams.from_config(config),
        part=part,
    )
    total_steps = int(config.train.total_steps)
    if not 0 <= start_step <= total_steps:
        raise ValueError(f"start_step {start_step} outside [0, total_steps={total_steps}]")
    workers = num_workers(config.data.workers) if mode == "host" else 0
    # Ends at total_steps with workers too: the blocks a worker leaves when it reaches the end
    # are freed by garbage collection, which `_close_open_iterators` runs before exit.
    dataset = grain.MapDataset.range(start_step, total_steps).map(maker)
    if workers > 0:
        _ensure_flags_parsed()
        # Each worker makes every W-th batch, one at a time, a couple of batches ahead.
        iter_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
            worker_init_fn=functools.partial(_exit_when_parent_ends, os.getpid()),
        )
        iterator = iter(iter_ds)
        _register_for_exit(iterator)
        return iterator
    # One background thread prepares the next batch while the train step runs.
    iter_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    return iter(iter_ds)


def test_batches(
    imageset: ImageSet, batch_size: int, *, crop_size: int = CROP_SIZE
) -> Iterator[dict[str, np.ndarray]]:
    """Centre-cropped test views in order, the last batch padded (mask False) to `batch_size`.

    Pass `crop_size=config.data.crop_size` (the size the model trained at). A fixed batch
    shape means the evaluation function compiles once.
    """
    n = len(imageset)
    size = int(crop_size)
    labels = np.asarray(imageset.labels, np.int32)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        image = np.zeros((batch_size, size, size, 3), np.uint8)
        label = np.zeros((batch_size,), np.int32)
        mask = np.zeros((batch_size,), bool)
        for j, i in enumerate(range(start, stop)):
            image[j] = augment_host.test_view(imageset.images[i], crop_size=size)
        label[: stop - start] = labels[start:stop]
        mask[: stop - start] = True
        yield {"image": image, "label": label, "mask": mask}


test_batches.__test__ = False  # an evaluation input, not a pytest test, when imported into tests
