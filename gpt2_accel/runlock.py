"""One writer per run directory: an OS lock on ``<output_dir>/.gpt2_accel.lock`` held for the life of the run.

The lock is ``fcntl.flock`` on a file inside ``output_dir``. The kernel releases it when the holding process dies,
however it dies (SIGKILL, OOM kill, node reboot), so a crashed run never blocks its relaunch and there is no lease
to tune. The holder writes its host, pid and start time into the file, only to name itself in the refusal message.

Which filesystems enforce it (see docs/reliability.md):

- local filesystems (ext4, xfs, btrfs, tmpfs): yes;
- NFS: yes, between clients, where the kernel maps ``flock`` to NFS byte-range locks (Linux >= 2.6.12; NFSv3 needs
  ``lockd``, NFSv4 has locking in the protocol). A lock of a client that vanished is freed when the server's lease
  expires (NFSv4, typically 90 s) or lockd notices the reboot (NFSv3). Mounted with ``nolock`` or ``local_lock``,
  the lock only excludes runs on the same node;
- Lustre: only when mounted with ``-o flock`` (cluster-wide); ``localflock`` excludes runs on the same node only;
  with neither, ``flock`` fails and the run refuses to start, naming ``force_unlock`` as the way past it;
- object-store FUSE mounts (s3fs, gcsfuse) and other filesystems without locks: as Lustre without ``flock``.

``force_unlock`` moves the old lock file aside (kept, renamed ``.gpt2_accel.lock.broken-<time>``) and locks a new
one, or runs without a lock where the filesystem has none. It is for a holder that cannot be reached: a node gone
with its NFS lock still held, or a filesystem without locks. A live holder keeps writing if forced past.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
import weakref
from pathlib import Path

LOCK_NAME = ".gpt2_accel.lock"

# The locks this process holds, so that a forked child can drop its copies (below).
_HELD: weakref.WeakSet[RunLock] = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock descriptors, leaving the lock to the parent.

    A flock belongs to the open file description, which ``fork`` shares. A worker that kept the descriptor would
    hold the run's lock after the trainer died until the worker noticed (torch's workers poll for their parent
    every few seconds), refusing an immediate relaunch; one that unlocked or truncated it would free the parent's
    lock. Closing the child's copy does neither: the parent's descriptor keeps the lock.
    """
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class RunLockedError(RuntimeError):
    """Another live process holds the run directory (or the filesystem cannot lock)."""


class RunLock:
    """``with RunLock(dir): ...`` or ``acquire()`` / ``release()``. Re-entrant per object, not per process."""

    def __init__(self, output_dir: str | os.PathLike, *, force: bool = False):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self.force = force
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError` naming the holder and the fix. Writes nothing else."""
        import fcntl

        if self._fd is not None:
            return self
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.force and self.path.exists() and not self._try_lock_existing():
            aside = self.path.with_name(f"{LOCK_NAME}.broken-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(
                self.path, aside
            )  # the stuck holder keeps its lock on the old inode; we lock a new file
            print(
                f"warning: force_unlock: moved the lock of {self.output_dir} aside to {aside.name}",
                file=sys.stderr,
            )
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(self._held_message()) from None
            if (
                self.force
            ):  # ENOLCK / EOPNOTSUPP / ENOSYS: this filesystem has no locks and the user accepts that
                print(f"warning: force_unlock: {self.output_dir} cannot be locked ({e.strerror}); running unlocked",
                      file=sys.stderr)  # fmt: skip
                return self
            raise RunLockedError(
                f"cannot lock output_dir {str(self.output_dir)!r} ({e.strerror}): its filesystem has no file locks "
                "(Lustre without -o flock, a FUSE mount, NFS without lockd?), so two runs could write it at once. "
                "Use a directory on a filesystem with locks, or set force_unlock=true if you are sure only one run "
                "writes there"
            ) from None
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        _HELD.add(self)
        return self

    def _try_lock_existing(self) -> bool:
        """True if the existing lock file is free (then force has nothing to break)."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def holder(self) -> dict:
        """What the current holder wrote about itself (empty if unreadable)."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def _held_message(self) -> str:
        h = self.holder()
        who = f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, started {h.get('started', '?')}"
        return (
            f"output_dir {str(self.output_dir)!r} is in use by another run ({who}). Wait for it to end or stop it "
            f"(`kill {h.get('pid', 'PID')}` on {h.get('host', 'that host')}), or use another output_dir; if that "
            "process is gone and the lock stays (a lost NFS client), relaunch with force_unlock=true"
        )

    def release(self) -> None:
        """Give the lock up (the file stays: deleting it would let two runs lock two different files)."""
        import fcntl

        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the last descriptor releases the flock
