"""One run per workdir: an exclusive lock on `<workdir>/.lock`.

    with WorkdirLock(workdir):        # raises WorkdirLockedError while another run holds it
        train(...)

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on `<workdir>/.lock`, so the operating system
releases it whenever the holding process ends, however it ends (SIGKILL included). While held,
the file records its holder as JSON: pid, host, start time (ISO 8601) and command line; a
second run fails at once with a `WorkdirLockedError` naming that holder and what to do.

A clean release empties the file and keeps it (deleting a flock file races with the next
acquirer). A record found in a lock that could be taken therefore belongs to a run that ended
without releasing (killed, or its machine lost): the lock is taken over and a message naming the
dead holder is printed to stderr.

The lock is only as good as the file system's flock: local disks and NFSv4 honour it across
processes (NFS across hosts too). Where flock is not supported at all, a warning is printed and
the run goes on unlocked.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time

LOCK_NAME = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock; the message names it."""


def holder_record() -> dict:
    """What this process writes into the lock file."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv) if sys.argv and sys.argv[0] else sys.executable,
    }


def describe_holder(record: dict | None) -> str:
    if not record:
        return "a process that has not yet written its record (it started a moment ago)"
    return (
        f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started "
        f"{record.get('start_time', '?')}, command: {record.get('command', '?')}"
    )


def _read_record(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    text = b"".join(chunks).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {"pid": "?", "command": f"(unreadable lock record {text[:80]!r})"}
    return record if isinstance(record, dict) else None


def _pid_alive_here(record: dict | None) -> bool | None:
    """True/False when the holder ran on this host, None when that cannot be told."""
    if not record or record.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(record["pid"]), 0)
    except (KeyError, TypeError, ValueError):
        return None
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLock:
    """Context manager (or `acquire()`/`release()`) holding `<workdir>/.lock` exclusively.

    After `acquire()`, `taken_over` is the record of a dead previous holder, or None.
    """

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(os.path.expanduser(workdir))
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self.record: dict | None = None
        self.taken_over: dict | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> WorkdirLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this WorkdirLock.")
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _read_record(fd)
            for _ in range(25):  # the holder may have locked but not yet written its record
                if record:
                    break
                time.sleep(0.02)
                record = _read_record(fd)
            os.close(fd)
            raise WorkdirLockedError(self._locked_message(record)) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            print(
                f"WARNING: the file system of {self.workdir} does not support locks "
                f"({e.strerror}); nothing stops a second run from writing into this workdir.",
                file=sys.stderr,
                flush=True,
            )
        try:
            previous = _read_record(fd)
            mine = {"pid": os.getpid(), "host": socket.gethostname()}
            if previous and {k: previous.get(k) for k in mine} != mine:
                self.taken_over = previous
                print(
                    f"Taking over the lock {self.path}: its holder ended without releasing it "
                    f"({describe_holder(previous)}).",
                    file=sys.stderr,
                    flush=True,
                )
            self.record = holder_record()
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(self.record) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _locked_message(self, record: dict | None) -> str:
        alive = _pid_alive_here(record)
        lines = [
            f"The workdir {self.workdir} is in use by another run: {describe_holder(record)}.",
        ]
        if alive is False:
            lines.append(
                f"Process {record.get('pid')} has ended, but a process it started (e.g. a data "
                f"worker) still holds {self.path}: stop it (`fuser -v {self.path}` names it)."
            )
        lines.append(
            "Wait for that run to finish, stop it (kill <pid>; it resumes from its last "
            "checkpoint when restarted), or use another --workdir."
        )
        return " ".join(lines)

    def release(self) -> None:
        """Empties the record and unlocks; the file stays (see the module docstring)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
