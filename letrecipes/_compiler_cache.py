"""torch's compiler cache folder that cannot be made, said in one line instead of 35.

torch makes its compiler cache folder (``$TORCHINDUCTOR_CACHE_DIR``, else
``torchinductor_<user>`` in the temporary folder) as ``torch._dynamo`` is imported, and
torchtune imports it through torchao: a folder that cannot be made (the variable pointing
at a filesystem this node does not mount, a read-only or full temporary folder) ended every
recipe and command at its first import in a traceback of torch's and torchao's frames,
before any line of letrecipes ran. A ``sys.excepthook`` names the folder, the variable and
the fix. Installed by ``import letrecipes`` (the venv's ``.pth``), so it is in place before
a recipe's imports; only a failure in torch's cache-folder code, in a letrecipes process,
is said this way.
"""

import os
import sys
import tempfile

CACHE_DIR_CODE = os.path.join("_inductor", "runtime", "cache_dir_utils.py")  # torch's own maker of the folder


def _raised_in(traceback, path_end: str) -> bool:
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename.endswith(path_end):
            return True
        traceback = traceback.tb_next
    return False


def _in_letrecipes(traceback) -> bool:
    if any("letrecipes" in word for word in getattr(sys, "orig_argv", sys.argv)):  # tune run letrecipes/x
        return True
    while traceback is not None:
        if f"{os.sep}letrecipes{os.sep}" in traceback.tb_frame.f_code.co_filename:
            return True
        traceback = traceback.tb_next
    return False


def line(error: OSError) -> str:
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


def _cache_folder_is_one_line(previous):
    def hook(kind, error, traceback):
        if not (issubclass(kind, OSError) and _raised_in(traceback, CACHE_DIR_CODE) and _in_letrecipes(traceback)
                and not os.environ.get("LETRECIPES_TRACEBACK")):
            return previous(kind, error, traceback)
        print(line(error), file=sys.stderr, flush=True)  # the interpreter exits with status 1
    hook.previous, hook.cache_folder_is_one_line = previous, True
    return hook


def install() -> None:
    from letrecipes._unknown_recipe import hook_installed

    if not hook_installed("cache_folder_is_one_line"):
        sys.excepthook = _cache_folder_is_one_line(sys.excepthook)
