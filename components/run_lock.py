"""One run per output folder: an exclusive lock that rank 0 holds for the whole run.

``<output_dir>/.letrecipes.lock`` holds its owner (pid, host, start time, command line)
and carries an advisory ``flock`` that the kernel drops when the owner exits in any way,
SIGKILL included. So a lock is "stale" exactly when no process holds the flock any more:
the next run takes it over without anyone deleting files by hand, and a second launch
while the owner lives stops with one line naming it.

Why flock and not a pid check: a pid says nothing across hosts and can be reused, and
two launches that both find a stale file must not both take it. ``flock`` decides in the
kernel (NFSv4 and Lustre map it to their lock managers). On a filesystem without locks
the run goes on with a warning: it cannot be protected there.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

from letrecipes.components.errors import LetRecipesError, LetRecipesWarning
from letrecipes.components.files import environment_errors, folders_to_make, names_the_open_file, remove_if_empty

LOCK_FILE = ".letrecipes.lock"


class RunLockError(LetRecipesError):
    pass


class RunLock:
    """``RunLock(output_dir)`` guards a run's folder; ``RunLock(path, lock_file=..., busy=...)``
    guards any other long writer (``letrecipes prepare-data --out``): ``lock_file`` is the lock's
    own path, ``busy(owner)`` the error line when another process holds it."""

    def __init__(self, output_dir: Union[str, Path], lock_file: Union[str, Path, None] = None,
                 busy: Optional[Callable[[str], str]] = None, key: str = "output_dir"):
        self.path = Path(lock_file) if lock_file is not None else Path(output_dir) / LOCK_FILE
        self.folder, self.key = Path(output_dir), key
        self._busy = busy or (lambda owner: (
            f"output_dir={str(self.folder)!r} is in use by another run: {owner}. Fix: wait for it to finish or stop "
            "it (a SIGTERM saves a checkpoint), or choose another output_dir."))
        self._fd: Optional[int] = None
        self._made_folders: list = []  # a run that made them and wrote nothing else removes them

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, log: Callable[[str], None] = print) -> "RunLock":
        """Take the lock or raise :class:`RunLockError` naming its owner."""
        self._made_folders = folders_to_make(self.path.parent)
        with environment_errors(self.key, f"creating {self.path}"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            with environment_errors(self.key, f"creating {self.path}"):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                taken = self._take_or_find_owner(fd)
            except OSError as err:  # no locks on this filesystem
                warnings.warn(f"{self.path}: this filesystem does not support file locks ({err.strerror}): two "
                              f"processes writing {self.key}={str(self.folder)!r} at once would not be detected.",
                              LetRecipesWarning, stacklevel=2)
                os.close(fd)
                return self
            if taken is not True:
                os.close(fd)
                raise RunLockError(self._busy(describe(taken)))
            # The file may have been released and unlinked between our open and our flock:
            # then we hold a lock on a name nobody sees. Start over on the current file.
            if names_the_open_file(self.path, fd):
                break
            os.close(fd)
        stale = self._read(fd)
        if stale:
            log(f"run lock: taking over {self.path} from {describe(stale)}, which is gone")
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def take_back(self, log: Callable[[str], None] = print) -> bool:
        """Take the lock again if its file is gone (its folder removed, or purged, while the run
        held it): a lock on a name nobody sees guards nothing, and a second launch would take the
        folder. True when it was taken again; a launch that took it meanwhile raises
        :class:`RunLockError` naming it."""
        if self._fd is None or names_the_open_file(self.path, self._fd):
            return False
        os.close(self._fd)
        self._fd, made_folders = None, self._made_folders
        self.acquire(log=log)
        self._made_folders = made_folders
        return True

    def release(self) -> None:
        """Remove the lock file and drop the lock (unlink first: a launch that opens the
        name after this sees a new file, one that opened it before retries, see acquire)."""
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass  # a read-only or vanished folder: the flock still goes with the descriptor
        os.close(self._fd)
        self._fd = None
        remove_if_empty(self._made_folders)  # a run that failed in setup leaves no folder

    @classmethod
    def _take_or_find_owner(cls, fd: int, wait_s: float = 3.0):
        """True once this process holds the flock, else the owner that holds it. A run writes
        its name right after it takes the flock, so a nameless holder is given ``wait_s``: a run
        that won the race by microseconds names itself, and a `letrecipes status` probe (a shared
        lock held for an instant, never named) lets go and the lock is ours."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            owner = cls._read(fd)
            if owner or time.monotonic() >= deadline:
                return owner
            time.sleep(0.02)

    @staticmethod
    def _read(fd: int) -> dict:
        return read_owner(fd)


def live_owner(output_dir: Union[str, Path]) -> Optional[dict]:
    """The owner of ``output_dir``'s run lock while a process holds it (the run is live),
    else None. It only looks: a shared lock for an instant, dropped at once."""
    try:
        fd = os.open(Path(output_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_owner(fd)
        except OSError:  # no locks on this filesystem: nothing can be told
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def read_owner(fd: int) -> dict:
    """The owner a lock file names (``{}`` before its owner has written it, and for content
    that is no owner's: the lock file of a killed run, damaged or edited, is taken over)."""
    try:
        owner = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}
    return owner if isinstance(owner, dict) else {}


def describe(owner: dict) -> str:
    if not owner:
        return "a process that has not written its name yet"
    argv = owner.get("argv")
    command = " ".join(map(str, argv)) if isinstance(argv, list) else ""
    return (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
            + (f" ({command[:200]})" if command else ""))
