"""How the project changes files: never in place, and with errors a user can act on.

Every file a run, a prepare or an export changes goes through :func:`replace_atomically`
(a temporary file beside it, flushed to disk, then renamed over it: a kill or a full disk
leaves either the old file or the new one, and no temporary file behind), or is cut back
with :func:`cut_at` (a truncation at a byte offset, which needs no free space). A
metrics file is appended to and cut, never rewritten.

:func:`environment_errors` turns what the operating system says (disk full, quota,
read-only, permission, a path that is a file) into one :class:`StorageError` line that
names the config key, the cause and what was kept. No torch here: the prepare step's
workers import this module.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import json
import os
import re
import socket
import stat
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

from letrecipes.components import tasks
from letrecipes.components.errors import LetRecipesError, StopRequested, errors_within, stop_within

# What each errno means to someone who has to fix it.
CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "a file size limit was reached (ulimit -f, or the filesystem's)",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file is where the folder should be",
    errno.EISDIR: "the path is a folder where a file is expected",
    errno.ENOENT: "the path does not exist",
    errno.EIO: "an input/output error (a failing disk or a lost network mount)",
    errno.ENAMETOOLONG: "the path is too long",
    # the network filesystems of clusters and the FUSE mounts of object stores (s3fs, gcsfuse)
    errno.ESTALE: "a stale network file handle (the file was replaced or removed from another machine of the "
                  "network filesystem)",
    errno.ENOTCONN: "the mount is disconnected (a FUSE mount such as s3fs, gcsfuse or sshfs that lost its "
                    "connection)",
    errno.ETIMEDOUT: "the network filesystem timed out",
    # an object store's FUSE mount (Mountpoint for S3: no rename, no append; gcsfuse without a hierarchical
    # namespace: no atomic folder rename) under output_dir or a cache
    errno.EOPNOTSUPP: "the filesystem does not support the operation (an object store's mount, such as Mountpoint "
                      "for S3, renames and appends to nothing)",
    errno.ENOSYS: "the filesystem does not implement the operation (an object store's mount, such as Mountpoint "
                  "for S3, renames and appends to nothing)",
    errno.EMFILE: "this process has too many open files",
    errno.ENFILE: "the system has too many open files",
    errno.ELOOP: "the path's symbolic links form a loop",
}
FIXES = {
    errno.ENOSPC: "free space",
    errno.EDQUOT: "free space under your quota",
    errno.EFBIG: "raise the file size limit",
    errno.EROFS: "point it at a writable folder",
    # one errno for a file that may not be read and a folder that may not be written: both said
    errno.EACCES: "make it readable (an input) or point it at a folder you may write (an output)",
    errno.EPERM: "make it readable (an input) or point it at a folder you may write (an output)",
    errno.ENOTDIR: "point it at a folder (or move the file away)",
    errno.EEXIST: "point it at a folder (or move the file away)",
    errno.ESTALE: "check that no other machine rewrites the path meanwhile",
    errno.ENOTCONN: "remount it (or copy the files to a local disk)",
    errno.ETIMEDOUT: "check the network filesystem's server",
    errno.EOPNOTSUPP: "point it at a POSIX filesystem (a local disk, NFS, Lustre) and copy to the bucket afterwards",
    errno.ENOSYS: "point it at a POSIX filesystem (a local disk, NFS, Lustre) and copy to the bucket afterwards",
    errno.EMFILE: "raise the open-file limit (ulimit -n, up to its hard limit: ulimit -Hn)",
    errno.ENFILE: "close other programs' files or raise fs.file-max",
    errno.ELOOP: "point it at the real file or folder",
}


# llama.cpp's gguf-split names its parts <name>-00001-of-00003.gguf, ...
SPLIT_GGUF = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")


def gguf_parts(path: Path) -> Optional[list]:
    """Every part of the split GGUF model ``path`` is one part of (by the names gguf-split
    gives them, the first first), or None for a path not named as a part."""
    named = SPLIT_GGUF.match(Path(path).name)
    if named is None:
        return None
    count = int(named["count"])
    return [Path(path).with_name(f"{named['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


# Paths that exist but hold no file a run can read twice (bash's <(zstdcat x.zst) is /dev/fd/63, a pipe).
SPECIAL_FILES = ((stat.S_ISFIFO, "a pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_file(path: Union[str, Path]) -> Optional[str]:
    """What ``path`` is when it exists as neither a regular file nor a folder ("a pipe
    (FIFO)", "a character device", ...); None otherwise, a missing path included."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return next((name for is_kind, name in SPECIAL_FILES if is_kind(mode)), None)


def refuse_special_file(path: Union[str, Path], key: str, error: type, fix: str, why: str = "") -> None:
    """Raise ``error`` with one line when ``path`` is a pipe, a device or a socket. A stream
    given where a file is read more than once would otherwise be taken for an empty folder
    ("holds none of the formats read") or hang a worker."""
    kind = special_file(path)
    if kind:
        raise error(f"{key}: {str(path)!r} is {kind}, not a file or a folder{why}. Fix: {fix}")


class StorageError(LetRecipesError):
    """The filesystem refused a read or a write (full, read-only, ...)."""


def unique_tmp(path: Path) -> Path:
    """A temporary name next to ``path`` that no other process on any host uses."""
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def is_utf8(text: str) -> bool:
    """Whether a name the file system or the shell gave holds no byte that is not UTF-8
    (Python keeps such bytes as lone surrogates, which every UTF-8 write then refuses)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# A UTF-8 locale, or Python's UTF-8 mode for this command alone: both read and write names as UTF-8
LOCALE_FIX = "run under a UTF-8 locale (export LC_ALL=C.UTF-8), or with PYTHONUTF8=1 (Python's UTF-8 mode)"


def names_encoding() -> str:
    """The encoding this process reads its command line and file names in, and the locale
    it comes from: ``iso8859-1 (its locale: LC_CTYPE=en_US.iso88591)``."""
    import locale
    import sys

    try:
        ctype = locale.setlocale(locale.LC_CTYPE, None)
    except locale.Error:
        ctype = "?"
    return f"{sys.getfilesystemencoding()} (its locale: LC_CTYPE={ctype})"


def utf8_names() -> bool:
    import codecs
    import sys

    return codecs.lookup(sys.getfilesystemencoding()).name == "utf-8"


def misread_as_utf8(text: str) -> Optional[str]:
    """``text`` as UTF-8 reads its bytes, where this process decoded them (a command line,
    a file name) in a locale encoding that is not UTF-8 and reads them otherwise: a UTF-8
    terminal or file system under an ISO-8859-1 or ASCII locale. None where the two agree,
    or the bytes are not UTF-8 (a Latin-1 name under a Latin-1 locale is what it says)."""
    if utf8_names():
        return None
    try:
        meant = os.fsencode(text).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return None
    return meant if meant != text else None


def unwritable_as_name(text: str) -> Optional[str]:
    """The characters of ``text`` that this process cannot write in a file name (its locale's
    encoding has none for them: a UTF-8 config's Chinese folder name under an ISO-8859-1
    locale); None where all can be."""
    try:
        os.fsencode(text)
    except UnicodeEncodeError as err:
        return text[err.start:err.end]
    return None


UNPRINTABLE = "letrecipes.escape"  # the error handler escape_unprintable_output registers


def escape_unprintable_output() -> None:
    """Under a locale whose encoding is not UTF-8, print what it has no character for as an
    escape (``\\u51fa``) rather than fail: a config value, a task name or a path printed to
    stdout was a UnicodeEncodeError traceback under ISO-8859-1. A file name's bytes that the
    locale did not decode are still printed as they were (Python's surrogateescape)."""
    import codecs
    import sys

    def escape(err: UnicodeError):
        if not isinstance(err, UnicodeEncodeError):
            raise err
        out = bytearray()
        for char in err.object[err.start:err.end]:
            if 0xDC80 <= ord(char) <= 0xDCFF:  # a byte surrogateescape kept
                out.append(ord(char) - 0xDC00)
            else:
                out += char.encode("ascii", "backslashreplace")
        return bytes(out), err.end

    try:
        codecs.lookup_error(UNPRINTABLE)
    except LookupError:
        codecs.register_error(UNPRINTABLE, escape)
    for stream in (sys.stdout, sys.stderr):
        encoding, errors = getattr(stream, "encoding", None), getattr(stream, "errors", None)
        # Python's own: strict (stdout), backslashreplace (stderr), surrogateescape (stdout under C)
        if encoding and errors in ("strict", "surrogateescape", "backslashreplace") \
                and codecs.lookup(encoding).name != "utf-8":
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.reconfigure(errors=UNPRINTABLE)


def replace_atomically(path: Union[str, Path], data: Union[str, bytes]) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers (and a
    kill) see the old content or the new, never a mix. A failed write removes the
    temporary file and leaves ``path`` as it was."""
    path = Path(path)
    tmp = unique_tmp(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and err.filename is None:  # a failed write names no file: the error line would not
            err.filename = str(path)
        raise


def names_the_open_file(path: Union[str, Path], fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed, nor replaced by another)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, which a batch scheduler's allocation
    sets (4 cores of a 128-core node under SLURM), not the node's count that os.cpu_count() gives."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS has no affinity
        return os.cpu_count() or 1


def new_file_mode() -> int:
    """The permission bits ``open()`` gives a new file in this process: 0o666 less the umask
    (read from /proc where there is one: setting the umask to read it back would change it,
    for a moment, for every thread of the process)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            return 0o666 & ~int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def json_cut_short(path: Union[str, Path]) -> Optional[str]:
    """"is cut short: ... after N bytes ..." when the file's JSON text stops inside a value
    (an interrupted download or copy: every error is at the very end); None when it parses
    or is wrong elsewhere."""
    data = Path(path).read_bytes()
    text = data.decode("utf-8", errors="replace")
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        # an unterminated string is named where it starts: the text ended inside it
        ended = not text[err.pos:].strip() or err.msg.startswith("Unterminated string")
        if text.strip() and ended:
            return (f"is cut short: its JSON stops inside a value after {len(data):,} bytes (an interrupted "
                    "download or copy)")
    return None


def cut_at(path: Union[str, Path], offset: int) -> None:
    """Drop everything after byte ``offset`` of ``path`` (no rewrite, no free space needed)."""
    os.truncate(path, offset)


RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")
PYTHON_OS_ERROR = re.compile(r"\[Errno (\d+)\] [^:\]\n]+(?:: '([^'\n]*)')?")


def os_error_in(err: BaseException, other_than: Tuple[int, ...] = ()) -> Optional[OSError]:
    """The ``OSError`` behind ``err``: itself, its cause or context, or one that
    torch.distributed.checkpoint wrapped per rank (``CheckpointException.failures``); the
    first whose errno is not in ``other_than``."""
    for e in errors_within(err):
        if isinstance(e, OSError) and e.errno is not None and e.errno not in other_than:
            return e
        # Rust libraries (safetensors, tokenizers) raise their own types around an io error: "(os error 28)"
        rust_io = RUST_IO_ERROR.search(str(e)) if not isinstance(e, OSError) else None
        if rust_io and int(rust_io.group(1)) not in other_than:
            code = int(rust_io.group(1))
            return OSError(code, os.strerror(code))
        # DCP folds the OS errors of a failed read into the text of its own AssertionError
        for found in (PYTHON_OS_ERROR.finditer(str(e)) if not isinstance(e, OSError) else ()):
            if int(found.group(1)) not in other_than:
                return OSError(int(found.group(1)), os.strerror(int(found.group(1))), found.group(2))
    return None


def describe(err: OSError) -> str:
    return cause_and_fix(err)[0]


def cause_and_fix(err: OSError) -> Tuple[str, str]:
    """What an OS error means, with its path, and what fixes it."""
    cause = CAUSES.get(err.errno, err.strerror or str(err))
    fix = FIXES.get(err.errno, "fix the path or the filesystem")
    if err.errno == errno.ENOENT and err.filename and _virtual_folder(Path(err.filename).parent):
        cause = "the folder is on a virtual filesystem (like /proc or /sys), which refuses new files"
    if err.errno == errno.ENOSPC and err.filename and _out_of_inodes(Path(err.filename)):
        # the same errno as a full disk, while df shows space free: said so, or the fix reads as wrong
        cause = ("the filesystem can hold no more files: its inodes are all used, while its space is not "
                 "(df -i shows them)")
        fix = "remove files you no longer need from it (many small ones free the most inodes), or use another filesystem"
    link = _dangling_link(err.filename) if err.errno in (errno.EEXIST, errno.ENOENT, errno.ENOTDIR) else None
    if link is not None:  # mkdir -p on a link to nowhere: EEXIST, read as "a file is where the folder should be"
        link, target = link
        return (f"{link} is a symbolic link to {target}, which does not exist",
                f"create what it points to (mkdir -p {target}) or point it at another folder")
    where = f" ({err.filename})" if err.filename else ""
    return f"{cause}{where}", fix


def nearest_existing(path: Path) -> Optional[Path]:
    """``path`` or its nearest parent that exists: where a folder about to be made will live,
    for the questions of its filesystem (space, inodes) asked before it is made."""
    return next((p for p in (path, *path.parents) if p.exists()), None)


def _out_of_inodes(path: Path) -> bool:
    """Whether the filesystem under ``path`` (its nearest folder that exists) has used up its
    inodes while it still has space: a tmpfs's nr_inodes, an ext4 made for few large files,
    millions of small cache files."""
    folder = nearest_existing(path)
    try:
        fs = os.statvfs(folder) if folder is not None else None
    except OSError:
        return False
    if fs is None or fs.f_files == 0:  # no fixed inode count (btrfs, many network filesystems)
        return False
    few_inodes = fs.f_favail <= max(16, fs.f_files // 1000)
    space_left = fs.f_bavail > max(fs.f_blocks // 100, (64 << 20) // max(fs.f_frsize, 1))
    return few_inodes and space_left


def _dangling_link(filename) -> Optional[Tuple[Path, Path]]:
    """The link on the way to ``filename`` (itself or a folder above it) that leads nowhere,
    with where it points."""
    if not filename:
        return None
    path = Path(os.path.abspath(str(filename)))
    for candidate in (path, *path.parents):
        try:
            if candidate.is_symlink() and not candidate.exists():
                return candidate, Path(os.path.join(candidate.parent, os.readlink(candidate)))
        except OSError:
            return None
    return None


def _virtual_folder(folder: Path) -> bool:
    """A folder of /proc, /sys and the like: the kernel's, with no blocks behind it."""
    try:
        return folder.is_dir() and os.statvfs(folder).f_blocks == 0
    except OSError:
        return False


@contextlib.contextmanager
def environment_errors(key: Union[str, Dict[str, Path]], doing: str, kept: Union[str, Callable[[], str]] = "",
                       then: str = "run the same command again", other_than: Tuple[int, ...] = (),
                       fixes: Optional[Dict[str, str]] = None) -> Iterator[None]:
    """Report an ``OSError`` (direct, or wrapped by a library) raised inside as one line:
    ``<key>: <doing> failed: <cause> (<file>). <kept> Fix: <fix>, then ...``.

    ``kept`` says what is intact (``"step 3's checkpoint is intact."``, or a function that
    says it when asked) so a user knows what they can go back to; ``then`` how to go on.
    ``key`` may map config keys to their folders: the one holding the failed path is
    named (the first when none does). Errors that are not about the environment pass
    through, and so do OS errors whose errno is in ``other_than`` alone. ``fixes`` gives a
    key's own way out beside the errno's fix (a temporary folder: another TMPDIR).
    """
    try:
        yield
    except (LetRecipesError, StopRequested):
        raise
    except BaseException as err:  # DCP's CheckpointException derives from BaseException
        stop = stop_within(err)
        if stop is not None:  # a signal's stop that a library wrapped (DCP gathers each rank's failure): itself
            raise stop from None
        failure = None if isinstance(err, (KeyboardInterrupt, SystemExit)) else tasks.start_failure(err)
        if failure is not None:  # a fork's EAGAIN is no file's error: the limit on threads and processes
            raise tasks.limit_error(failure, doing, kept() if callable(kept) else kept, then) from err
        os_err = os_error_in(err, other_than)
        if os_err is None or isinstance(err, (KeyboardInterrupt, SystemExit, BrokenPipeError)):
            raise  # a closed pipe is the reader gone (`| head`), not the storage
        cause, fix = cause_and_fix(os_err)
        named = _key_for(key, os_err)
        fix = f"{fix}, or {(fixes or {})[named]}" if named in (fixes or {}) else fix
        kept_text = kept() if callable(kept) else kept
        raise StorageError(f"{named}: {doing} failed: {cause}. "
                           f"{kept_text + ' ' if kept_text else ''}Fix: {fix}, then {then}.") from err


def _key_for(key: Union[str, Dict[str, Path]], err: OSError) -> str:
    """The key whose folder holds the failed path, or was being made when it failed (the
    failed path one of its parents: a cache folder under a read-only home); the closest of
    them (a folder inside TMPDIR is its own key's); else the first."""
    if isinstance(key, str):
        return key
    failed = Path(os.path.abspath(str(err.filename))) if err.filename else None
    closeness = {}
    for name, folder in key.items():
        folder = Path(os.path.abspath(folder))
        if failed is not None and folder in (failed, *failed.parents):
            closeness[name] = len(folder.parts)
        elif failed is not None and failed in folder.parents:
            closeness[name] = len(failed.parts)
    return max(closeness, key=closeness.get) if closeness else next(iter(key))


def first_names(folder: Path, count: int = 3) -> str:
    """``a, b, c, ...``: what a folder holds, for an error that refuses to write into it."""
    names = sorted(p.name for p in Path(folder).iterdir())
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def folders_to_make(folder: Union[str, Path]) -> list:
    """The folders ``mkdir(parents=True)`` would make for ``folder``, deepest first: what a
    command that fails before writing anything removes again (each only while empty)."""
    folder, missing = Path(folder).absolute(), []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def check_writable_folder(folder: Union[str, Path], key: str, keep: bool = True) -> None:
    """Make ``folder`` (if needed) and prove it takes a file, before any work starts.
    ``keep=False``: the folders made for the proof are removed again, for a command that
    writes there only at its end (a failure before then leaves no empty folder behind)."""
    folder = Path(folder)
    made = folders_to_make(folder)
    with environment_errors(key, f"writing to {folder}"):
        if folder.exists() and not folder.is_dir():
            raise StorageError(f"{key}={str(folder)!r} is a file, not a folder. Fix: point {key} at a folder, "
                               "or move the file away.")
        folder.mkdir(parents=True, exist_ok=True)
        probe = unique_tmp(folder / "write-probe")
        try:
            with open(probe, "wb") as out:
                out.write(b"letrecipes")
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
            if not keep:
                remove_if_empty(made)


def remove_if_empty(folders: list) -> None:
    """Remove each of ``folders`` (deepest first, as :func:`folders_to_make` lists them) while
    it is empty; stop at the first that is not (another process may have written into it)."""
    for folder in folders:
        try:
            Path(folder).rmdir()
        except OSError:
            break


def hub_snapshot(folder: Path) -> Optional[Path]:
    """The files a ``huggingface_hub`` cache folder (``models--org--name``, ``datasets--org--name``:
    blobs/, refs/, snapshots/) serves: the snapshot refs/main names, else its only snapshot;
    None for any other folder. Its files are links into blobs/, which are read through them."""
    snapshots = folder / "snapshots"
    if not (folder.name.startswith(("models--", "datasets--")) and snapshots.is_dir()):
        return None
    ref = folder / "refs" / "main"
    named = snapshots / ref.read_text().strip() if ref.is_file() else None
    if named is not None and named.is_dir():
        return named
    found = [p for p in snapshots.iterdir() if p.is_dir()]
    return found[0] if len(found) == 1 else None


def hub_cache() -> Path:
    """Where ``huggingface_hub`` keeps downloads: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


# A URL as a path (pathlib keeps one slash of "https://"): nothing is downloaded
URL = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*):/+(?P<rest>.*)$", re.IGNORECASE)
HUB_URL = re.compile(r"^(?:huggingface\.co/)?(?P<datasets>datasets/)?(?P<id>[^/]+/[^/]+)")  # after the scheme
FETCH = {"s3": "aws s3 cp --recursive URL DIR", "gs": "gsutil -m cp -r URL DIR", "gcs": "gsutil -m cp -r URL DIR"}


# a folder is read this far for names close to a missing one (a million-file corpus folder is not listed)
NEARBY_SCAN_LIMIT = 5000


def nearby(path: Union[str, Path]) -> str:
    """For a path that does not exist: what does exist where it points, as one sentence ("" when
    nothing helps). The step checkpoints of a ``checkpoints`` folder (a step that was never
    saved, or was rotated out); the names close to a mistyped one; or, when a folder on the
    way is missing, the deepest one that exists."""
    target = Path(os.path.abspath(os.path.expanduser(str(path))))
    if target.exists():
        return ""
    link = _dangling_link(target)  # else it is "close by" itself, its own name being in its folder
    if link is not None:
        return f"{link[0]} is a symbolic link to {link[1]}, which does not exist."
    base = target.parent
    while not base.is_dir() and base != base.parent:
        base = base.parent
    missing = target.relative_to(base).parts[0] if base != target else ""
    try:
        with os.scandir(base) as entries:
            names = [e.name for _, e in zip(range(NEARBY_SCAN_LIMIT), entries)]
    except OSError:
        return ""
    steps = sorted(n for n in names if re.fullmatch(r"step_\d+", n))
    if base == target.parent and steps:
        shown = steps if len(steps) <= 4 else [steps[0], "...", *steps[-2:]]
        return f"{base} holds {len(steps)} step checkpoint(s): {', '.join(shown)} (the newest last)."
    close = difflib.get_close_matches(missing, names, n=3, cutoff=0.6)
    where = "" if base == target.parent or base == base.parent else f"{base / missing} does not exist ({base} does). "
    if close:
        return where + f"Close by in {base}: {', '.join(repr(str(base / n)) for n in close)}."
    return where.strip()


def real_paths(paths) -> Iterator[tuple]:
    """``(os.path.realpath(p), os.stat(p))`` for each path (the stat None for a path that does not
    exist), with one ``lstat`` a path that is not a
    link: ``realpath`` checks every part of a path again for links, which for a corpus of many
    files in few folders is the same folders again and again (200,000 files: 5 s of a
    launch's 6.5 s). A folder's real path is found once; a link is resolved in full."""
    import stat as stat_module

    folders: Dict[str, str] = {}
    for path in paths:
        text = os.fspath(path)
        try:
            info = os.lstat(text)
        except OSError:  # gone (a prepared folder's record of its sources): realpath alone, no stat
            yield os.path.realpath(text), None
            continue
        if stat_module.S_ISLNK(info.st_mode):
            yield os.path.realpath(text), os.stat(text)
            continue
        folder, name = os.path.split(os.path.abspath(text))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        yield os.path.join(folders[folder], name), info


def as_given(path: Union[str, Path]) -> str:
    """A path as the user wrote it: a URL keeps the ``//`` that ``pathlib`` folds into one."""
    return URL.sub(lambda m: f"{m['scheme']}://{m['rest']}", str(path), count=1)


# what a relative path's last part ends with when it names a file (a Hub id may hold dots: Qwen2.5-0.5B)
FILE_SUFFIXES = {".json", ".jsonl", ".gguf", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".parquet",
                 ".csv", ".tsv", ".gz", ".zst", ".bz2", ".xz", ".lz4", ".arrow", ".feather", ".yaml", ".yml",
                 ".tiktoken"}


def hub_id_hint(path: Union[str, Path], key: str, kind: str = "model") -> str:
    """For a path that does not exist: when it reads like a Hugging Face Hub id
    (``meta-llama/Llama-3.2-1B``: two parts, relative, the first not a folder here) or a Hub
    URL (``https://huggingface.co/datasets/org/name/resolve/main/file``, ``hf://datasets/...``),
    the sentence that says nothing is downloaded and how to fetch it (only the file or
    folder the URL names, not the whole repository), or where the Hugging Face cache already
    holds it; for another URL (``https://``, ``s3://``, ``gs://``), how to download it
    first; otherwise ""."""
    inner = ""  # a file or folder inside the repository that a Hub URL names
    url = URL.match(str(path))
    if url:
        scheme, rest = url["scheme"].lower(), url["rest"]
        hub = HUB_URL.match(rest) if scheme == "hf" or rest.startswith("huggingface.co/") else None
        if hub is None:
            fetch = FETCH.get(scheme, "curl -L -O URL, or your storage's copy command").replace(
                "URL", f"{scheme}://{rest}").replace("DIR", "data/")
            return (f"It is a URL: letrecipes reads local files only and never downloads. Fix: download it first "
                    f"({fetch}) and set {key} to the local copy.")
        kind = "dataset" if hub["datasets"] else kind
        path, inner = Path(hub["id"]), re.sub(r"^/?(?:(?:resolve|blob|tree)/[^/]+/)?", "", rest[hub.end():])
    path = Path(path)
    if len(path.parts) != 2 or path.is_absolute() or path.parts[0].startswith((".", "~", "$")) or Path(path.parts[0]).exists():
        return ""
    if not url and path.suffix.lower() in FILE_SUFFIXES:  # tok/tokenizer.json is a file's path, not an id
        return ""
    cached = hub_snapshot(hub_cache() / f"{kind}s--{path.parts[0]}--{path.parts[1]}")
    if cached is not None and (not inner or (cached / inner).exists()):
        return (f"It looks like a Hugging Face Hub {kind} id, and your Hugging Face cache holds it (letrecipes reads "
                f"paths, never ids). Fix: {key}={cached / inner if inner else cached}")
    repo_type = " --repo-type dataset" if kind == "dataset" else ""
    local = f"{'data' if kind == 'dataset' else 'models'}/{path.name}"
    inner = inner.rstrip("/")
    what = (f" {inner}" if Path(inner).suffix else f" --include '{inner}/*'") if inner else ""
    return (f"It looks like a Hugging Face Hub {kind} id: letrecipes reads local files only and never downloads. "
            f"Fix: download it first (huggingface-cli download {path.as_posix()}{what}{repo_type} --local-dir "
            f"{local}) and set {key}={local}{'/' + inner if inner else ''}.")


def in_outputs(path: Union[str, Path]) -> bool:
    """A path under an ``outputs`` folder, where the demo and the tiny configs write: for one
    that is missing, their commands are the fix; for any other, a model or corpus the user
    brings, they are not."""
    return "outputs" in Path(path).parts


# Where the model families that users bring as teachers publish on the Hugging Face Hub, by
# the start of a repository's name (case ignored): for a missing folder named like one of
# them, the download that fills it. Gated ones need their licence accepted first.
HUB_ORGS = (("llama-", "meta-llama"), ("meta-llama-", "meta-llama"), ("smollm", "HuggingFaceTB"), ("qwen", "Qwen"),
            ("pythia-", "EleutherAI"), ("opt-", "facebook"), ("mistral-", "mistralai"), ("gemma-", "google"),
            ("phi-", "microsoft"), ("tinyllama", "TinyLlama"), ("olmo-", "allenai"))
GATED_ORGS = ("meta-llama", "mistralai", "google")


def model_folder_hint(path: Union[str, Path], key: str) -> str:
    """For a local path that does not exist and whose folder is named like a model
    (``/models/Llama-3.2-1B``, ``/models/SmolLM2-135M/tokenizer.json``): where the Hugging
    Face cache already holds a model of that name (any organisation), the path to it;
    else, for a family of :data:`HUB_ORGS`, the download that fills the folder; otherwise ""."""
    target = Path(os.path.expanduser(str(path)))
    folder = target.parent if target.suffix.lower() in FILE_SUFFIXES else target
    inner = target.name if folder is not target else ""
    name = folder.name
    if not name or URL.match(str(path)) or not re.search(r"\d", name):  # a model's name carries its size or version
        return ""
    try:
        cached = sorted(p for p in hub_cache().glob("models--*--*") if p.name.split("--", 2)[2].lower() == name.lower())
    except OSError:
        cached = []
    for entry in cached:
        snapshot = hub_snapshot(entry)
        if snapshot is not None and (not inner or (snapshot / inner).exists()):
            repo = "/".join(entry.name.split("--", 2)[1:])
            return (f"Your Hugging Face cache holds {repo} (letrecipes reads paths and never downloads). Fix: "
                    f"{key}={snapshot / inner if inner else snapshot}")
    org = next((org for start, org in HUB_ORGS if name.lower().startswith(start)), None)
    if org is None:
        return ""
    gated = (f" (a gated model: accept its licence on huggingface.co/{org}/{name} and `huggingface-cli login` first)"
             if org in GATED_ORGS else "")
    return (f"It is named like the Hugging Face model {org}/{name}; letrecipes reads local files only and never "
            f"downloads. Fix: download it there{gated}: huggingface-cli download {org}/{name} --local-dir "
            f"{folder}; or point {key} at your copy.")


LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
HTML_STARTS = (b"<!doctype html", b"<html", b"<?xml version")


def stand_in(path: Union[str, Path], expected: str, html: bool = True, head: Optional[bytes] = None) -> Optional[str]:
    """What a file is instead of ``expected`` when it is a stand-in that a download leaves
    behind: a Git LFS pointer (a repository cloned or copied without Git LFS fetching its
    large files: the most common way a Hub checkout holds no weights) or, where ``html``, an
    HTML page (an error or sign-in page saved under the file's name). None otherwise, and
    for a file that cannot be read. ``head``: the file's first bytes, when the caller has
    read them (a pointer is about 130 bytes)."""
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(1024)
        except OSError:
            return None
    if head.startswith(LFS_POINTER):
        shown = as_given(path)
        size = re.search(rb"\nsize (\d+)", head)
        of = f" for a file of {int(size[1]):,} bytes" if size else ""
        return (f"{shown!r} is a Git LFS pointer ({len(head)} bytes{of}), not {expected}: its repository was cloned or "
                "copied without Git LFS fetching the file. Fix: run `git lfs install && git lfs pull` in that "
                "repository, or download it with `hf download <repo id>`.")
    if html and head.lstrip(b"\xef\xbb\xbf \t\r\n")[:16].lower().startswith(HTML_STARTS):
        return (f"{as_given(path)!r} is a web page (HTML or XML), not {expected}: a download that received an error or "
                "sign-in page instead of the file. Fix: download it again (`hf download <repo id>`; a gated repository needs "
                "`hf auth login` first).")
    return None


def shortened(text: str, limit: int = 60) -> str:
    """``text`` cut in its middle to ``limit`` characters, most of them from its end: where
    two paths differ, it is at their end."""
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head] + "..." + text[-(limit - head - 3):]


def file_identity(path: Path) -> str:
    """What tells one file at ``path`` from another there, for a cache of what was read from
    it: its inode, size and time, and its first MiB hashed (a GGUF file's metadata): file
    times move in steps of a few ms, in which a file can be rewritten in place at the same size."""
    info = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return f"{info.st_ino}:{info.st_size}:{info.st_mtime_ns}:{head}"
