"""Run a module with an OS error injected: ``python tests/io_fault.py [--read] NAME ERRNO -- MODULE
ARGS...`` makes the first open for writing (``--read``: for reading) of a file whose name
contains NAME fail with ERRNO (a name such as ENOSPC or EIO), as a full disk, a quota, a
failing disk or a lost mount fails it. ``NAME#N``: the N-th such open. Python's audit hook
on ``open`` raises before the file is touched: the process meets the error where its own
code opens the file, whatever library it goes through (os.open, io.open, tempfile). ERRNO
``SIGTERM``: the process sends itself SIGTERM there instead, so its handler runs inside that
open (a scheduler's notice landing in the middle of a library's read)."""
import signal
import errno
import os
import runpy
import sys


def main() -> None:
    reading = sys.argv[1] == "--read"
    argv = sys.argv[2:] if reading else sys.argv[1:]
    name, _, nth = argv[0].partition("#")
    code, nth = (None if argv[1] == "SIGTERM" else getattr(errno, argv[1])), int(nth or 1)
    module, args = argv[3], argv[4:]
    fired, seen = [], []

    def hook(event, details):
        if event != "open" or fired or not details or not isinstance(details[0], (str, bytes, os.PathLike)):
            return
        path = os.fsdecode(details[0])
        mode = details[1] if len(details) > 1 else "r"
        flags = details[2] if len(details) > 2 else 0
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing != reading and name in os.path.basename(path) and not os.path.isdir(path):
            seen.append(path)
            if len(seen) < nth:
                return
            fired.append(path)
            if code is None:
                os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before this open returns
                return
            raise OSError(code, os.strerror(code), path)

    sys.addaudithook(hook)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
