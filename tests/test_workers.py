"""grain worker processes end with their run, and leave no shared memory behind.

A subprocess (`WORKER_RUN` below) builds `train_iterator` with 2 workers on a tiny synthetic
dataset and reads a few batches; then it is killed, terminated, interrupted or exits. Every
process and /dev/shm segment of one run carries a marker (an environment variable inherited by
the workers and the resource tracker; a name prefix for shared memory and semaphores), so
other processes on the machine are never counted, and any survivor is killed at the end.
"""

import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest
from conftest import REPO

from configs.base import get_config
from ssl_jax.data import train_iterator
from ssl_jax.data.synthetic import synthetic_dataset

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc and /dev/shm"
)

MARKER_ENV = "SSL_JAX_WORKER_TEST"
SHM = "/dev/shm"

# The run. Module level runs in the spawned workers too (as __mp_main__): there it names their
# shared memory after the marker.
WORKER_RUN = """
import multiprocessing, os, secrets, sys, time
from multiprocessing import shared_memory

MARKER = os.environ["SSL_JAX_WORKER_TEST"]
shared_memory._make_filename = lambda: f"/psm_{MARKER}_{secrets.token_hex(6)}"
multiprocessing.current_process()._config["semprefix"] = f"/mp-{MARKER}"


def main(how):
    from configs.base import get_config
    from ssl_jax.data import train_iterator
    from ssl_jax.data.synthetic import synthetic_dataset

    data = synthetic_dataset(num_classes=2, num_unlabelled=16, num_labelled=4, image_size=64)
    config = get_config()
    config.data.batch_size, config.data.mu, config.data.workers = 2, 2, 2
    config.train.total_steps = 6 if how == "to_end" else 1000  # else: workers stay busy
    iterator = train_iterator(data, config, views=("u_w", "u_s0"))
    if how == "to_end":
        assert len(list(iterator)) == 6
        iterator.close()
        return
    batches = [next(iterator) for _ in range(3)]  # the workers hold the next ones in flight
    print("ready", flush=True)
    if how == "exception":
        raise RuntimeError("the run fails with batches in flight")
    if how == "wait":
        time.sleep(120)  # until the test signals us


if __name__ == "__main__":
    main(sys.argv[1])
"""


def _marked_processes(marker: str) -> set[int]:
    """Live (not zombie) processes whose environment holds the marker."""
    found = set()
    needle = f"{MARKER_ENV}={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if state != "Z" and needle in environ:
            found.add(int(entry))
    return found


def _marked_segments(marker: str) -> list[str]:
    return sorted(name for name in os.listdir(SHM) if marker in name)


def _wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.fixture
def worker_run(tmp_path):
    """start(how) -> (process, marker): a run in its own session; survivors are killed after."""
    script = tmp_path / "worker_run.py"
    script.write_text(WORKER_RUN)
    started = []

    def start(how: str) -> tuple[subprocess.Popen, str]:
        marker = "w" + uuid.uuid4().hex[:10]
        env = dict(os.environ, **{MARKER_ENV: marker}, PYTHONPATH=str(REPO))
        proc = subprocess.Popen(
            [sys.executable, str(script), how],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started.append((proc, marker))
        return proc, marker

    yield start
    for proc, marker in started:
        for pid in _marked_processes(marker) | ({proc.pid} if proc.poll() is None else set()):
            try:
                os.kill(pid, signal.SIGKILL)  # survivors hold the pipes communicate() reads
            except ProcessLookupError:
                pass
        proc.communicate(timeout=30)
        for name in _marked_segments(marker):
            os.unlink(os.path.join(SHM, name))


def _wait_ready(proc: subprocess.Popen, timeout: float = 180) -> None:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else "(no output in time)"
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"the run did not start: {line!r}\n{err[-3000:]}")


KILLS = {
    "sigkill_main_alone": lambda proc: os.kill(proc.pid, signal.SIGKILL),
    "sigterm_process_group": lambda proc: os.killpg(proc.pid, signal.SIGTERM),  # a scheduler
}


def test_workers_and_shared_memory_go_when_the_run_is_killed(worker_run):
    runs = {how: worker_run("wait") for how in KILLS}  # side by side: half the wall time
    for how, (proc, marker) in runs.items():
        _wait_ready(proc)
        assert len(_marked_processes(marker) - {proc.pid}) == 3, how  # 2 workers + the tracker
        assert _marked_segments(marker), "the run should hold shared memory while it runs"
    for how, (proc, _) in runs.items():
        KILLS[how](proc)
    for how, (proc, marker) in runs.items():
        assert proc.wait(timeout=30) < 0, how  # died of the signal
        assert _wait_until(lambda m=marker: not _marked_processes(m), timeout=10), (
            f"survivors after {how}: {_marked_processes(marker)}"
        )
        assert _wait_until(lambda m=marker: not _marked_segments(m), timeout=10), (
            f"/dev/shm left after {how}: {_marked_segments(marker)}"
        )


@pytest.mark.heavy(15)
def test_a_run_that_ends_leaves_nothing_and_warns_nothing(worker_run):
    """Read to the end and closed; left open with batches in flight; an exception; Ctrl-C."""
    scripts = {"to_end": "to_end", "in_flight": "exit", "exception": "exception", "sigint": "wait"}
    # An uncaught KeyboardInterrupt ends Python by SIGINT, after its exit handlers.
    expected = {"to_end": 0, "in_flight": 0, "exception": 1, "sigint": -signal.SIGINT}
    runs = {how: worker_run(script) for how, script in scripts.items()}
    proc, _ = runs["sigint"]
    _wait_ready(proc)
    os.kill(proc.pid, signal.SIGINT)  # the main process alone: KeyboardInterrupt
    for how, (proc, marker) in runs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == expected[how], (how, err[-3000:])
        assert "leaked shared_memory" not in err and "leaked semaphore" not in err, err[-3000:]
        assert "Exception ignored" not in err, err[-3000:]
        assert _wait_until(lambda m=marker: not _marked_processes(m), timeout=10), how
        assert not _marked_segments(marker), how


def test_workers_outlive_the_thread_that_started_them(monkeypatch):
    """grain starts each worker from a prefetch thread that `set_state` ends; the worker stays.

    (So the workers cannot rely on `prctl(PR_SET_PDEATHSIG)`, which fires when the *thread*
    that started them exits; they watch their parent process instead.)
    """
    starters, started = [], []
    original_start = multiprocessing.process.BaseProcess.start

    def recording_start(self):
        starters.append(threading.current_thread())
        original_start(self)
        started.append(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", recording_start)
    data = synthetic_dataset(num_classes=2, num_unlabelled=16, num_labelled=4, image_size=64)
    config = get_config()
    config.data.batch_size, config.data.mu, config.data.workers = 2, 2, 0
    config.train.total_steps = 8
    views = ("u_w", "u_s0")
    reference = list(train_iterator(data, config, views=views))
    config.data.workers = 2
    iterator = train_iterator(data, config, views=views)
    result = {}

    def consume():
        result["first"] = [next(iterator) for _ in range(3)]
        # This iterator's workers (other tests' children of this process may come and go).
        ours = list(started)
        result["workers"] = sorted(p.pid for p in ours if p.is_alive())
        result["starters"] = list(starters)  # this iterator's; other threads may start more later
        iterator.set_state(iterator.get_state())  # ends the threads that started the workers
        time.sleep(1.0)
        result["after"] = sorted(p.pid for p in ours if p.is_alive())
        result["rest"] = list(iterator)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(timeout=120)
    try:
        assert not thread.is_alive(), "the iterator hung after set_state"
        ours = result["starters"]
        assert len(ours) == 2 and all(t is not threading.main_thread() for t in ours), starters
        assert not any(t.is_alive() for t in ours)  # the starting threads have ended ...
        assert len(result["workers"]) >= 2 and result["after"] == result["workers"]  # ... not so
        got = result["first"] + result["rest"]
        assert len(got) == len(reference) == 8
        for a, b in zip(got, reference, strict=True):
            for key in b:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    finally:
        iterator.close()
