"""What the environment breaks before any line of letrecipes runs, said in one line.

A recipe or ``tune`` dies in its first imports, in tracebacks of other projects' frames,
where the machine lacks something they assume; a ``sys.excepthook``, installed by ``import
letrecipes`` (the venv's ``.pth``, so in place before those imports), names what is missing
and the fix, for a letrecipes process (or ``tune``) only:

- torch's compiler cache folder that cannot be made. torch makes it
  (``$TORCHINDUCTOR_CACHE_DIR``, else ``torchinductor_<user>`` in the temporary folder) as
  ``torch._dynamo`` is imported, and torchtune imports that through torchao: the variable
  pointing at a filesystem this node does not mount, a file where a folder should be.
- a user without a home folder: ``HOME`` unset and no ``/etc/passwd`` entry for the uid (a
  container started with ``docker run --user 4242``). ``tune`` imports kagglehub (for ``tune
  download``), which looks up the home folder as it is imported: every ``tune`` command
  failed in ``RuntimeError: Could not determine home directory``.
"""

import os
import sys
import tempfile

CACHE_DIR_CODE = os.path.join("_inductor", "runtime", "cache_dir_utils.py")  # torch's own maker of the folder


def _files_of(traceback):
    """The source file of each frame the exception passed through, outermost first."""
    while traceback is not None:
        yield traceback.tb_frame.f_code.co_filename
        traceback = traceback.tb_next


def _raised_in(traceback, path_end: str) -> bool:
    return any(name.endswith(path_end) for name in _files_of(traceback))


def _in_letrecipes(traceback) -> bool:
    """A letrecipes process: named on its command line (tune run letrecipes/x), started as
    ``tune`` (its recipes are ours to run), or failing under a letrecipes frame."""
    words = getattr(sys, "orig_argv", sys.argv)
    if any("letrecipes" in word for word in words) or any(os.path.basename(word) == "tune" for word in words[:2]):
        return True
    return any(f"{os.sep}letrecipes{os.sep}" in name for name in _files_of(traceback))


def cache_folder_line(error: OSError) -> str:
    from letrecipes.components.files import cause_and_fix  # torch-free

    cause, fix = cause_and_fix(error)
    named = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    where = ("TORCHINDUCTOR_CACHE_DIR" if named else
             f"torch's default: torchinductor_<user> in the temporary folder, {tempfile.gettempdir()}")
    other = ("TORCHINDUCTOR_CACHE_DIR=<a folder you can write> (or unset it: torch then uses torchinductor_<user> "
             "in the temporary folder)" if named else
             "TORCHINDUCTOR_CACHE_DIR=<a folder you can write>, or TMPDIR=<one> for the temporary folder")
    return (f"error: torch cannot make its compiler cache folder ({where}): {cause}. torch makes it as it is "
            f"imported, so nothing ran. Fix: {fix}, or {other}.")


def no_home_line() -> str:
    return (f"error: this user (uid {os.getuid()}) has no home folder: HOME is not set and the user has no entry in "
            "/etc/passwd (a container started with --user), and torchtune's command line looks it up as it starts "
            "(kagglehub, which `tune download` uses). Fix: export HOME=<a folder you can write> (docker run -e "
            "HOME=/tmp ...), or start the recipe without tune: python -m letrecipes.let_pretrain --config ...")


def _no_home(kind, error) -> bool:
    return issubclass(kind, RuntimeError) and str(error) == "Could not determine home directory." and \
        not os.environ.get("HOME")


def _start_failures_are_one_line(previous):
    def hook(kind, error, traceback):
        if os.environ.get("LETRECIPES_TRACEBACK") or not _in_letrecipes(traceback):
            return previous(kind, error, traceback)
        if issubclass(kind, OSError) and _raised_in(traceback, CACHE_DIR_CODE):
            print(cache_folder_line(error), file=sys.stderr, flush=True)  # the interpreter exits with status 1
        elif _no_home(kind, error):
            print(no_home_line(), file=sys.stderr, flush=True)
        else:
            return previous(kind, error, traceback)
    hook.previous, hook.start_failures_are_one_line = previous, True
    return hook


def install() -> None:
    from letrecipes._unknown_recipe import hook_installed

    if not hook_installed("start_failures_are_one_line"):
        sys.excepthook = _start_failures_are_one_line(sys.excepthook)
