"""The workdir lock, with real processes: a second run fails fast; a dead holder is taken over."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ssl_jax.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLDER = textwrap.dedent(
    """
    import sys, time
    from ssl_jax.workdir_lock import WorkdirLock
    lock = WorkdirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
    """
)


def start_holder(workdir):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()
    return proc


def test_second_process_fails_fast_then_takes_over_after_kill(tmp_path, capsys):
    holder = start_holder(tmp_path)
    try:
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["pid"] == holder.pid and record["host"] and record["start_time"]
        assert record["command"]

        # A second process (another interpreter, as a second `launch.py` would be).
        other = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from ssl_jax.workdir_lock import WorkdirLock; "
                "WorkdirLock(sys.argv[1]).acquire()",
                str(tmp_path),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert other.returncode != 0
        assert "WorkdirLockedError" in other.stderr and f"pid {holder.pid}" in other.stderr

        # And this process: fails at once, naming pid, host, start time and what to do.
        start = time.monotonic()
        with pytest.raises(WorkdirLockedError) as e:
            WorkdirLock(str(tmp_path)).acquire()
        assert time.monotonic() - start < 1.0
        message = str(e.value)
        assert f"pid {holder.pid}" in message and record["host"] in message
        assert record["start_time"] in message
        assert "--workdir" in message and "Wait" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
        holder.stderr.close()

    capsys.readouterr()
    lock = WorkdirLock(str(tmp_path)).acquire()
    try:
        assert lock.taken_over["pid"] == holder.pid
        err = capsys.readouterr().err
        assert "Taking over" in err and f"pid {holder.pid}" in err
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_release_empties_the_record_and_next_acquire_is_quiet(tmp_path, capsys):
    with WorkdirLock(str(tmp_path / "new")) as lock:
        assert lock.held
        assert json.loads((tmp_path / "new" / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
            WorkdirLock(str(tmp_path / "new")).acquire()  # a second descriptor conflicts too
    assert not lock.held
    assert (tmp_path / "new" / LOCK_NAME).read_text() == ""
    with WorkdirLock(str(tmp_path / "new")) as again:
        assert again.taken_over is None
    assert "Taking over" not in capsys.readouterr().err
