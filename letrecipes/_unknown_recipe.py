"""``tune run letrecipes/<typo>`` and ``python -m letrecipes.<typo>`` answered in one line.

``tune run`` turns a recipe path it does not know into a module name and hands it to
``runpy``, which finds no such module and stops with a 15-line traceback ending in
``ImportError``. A finder placed last on ``sys.meta_path`` (so every real module is found
first) answers only names one level under ``letrecipes`` that nothing else found, and only
when runpy asks. ``runpy`` asks its loader for code, which exits with the recipes there are
and the closest one; an ``import`` of such a name still raises ``ModuleNotFoundError`` and
``importlib.util.find_spec`` gives None, as before. A top-level name is answered too when
it is one of the recipes' without the package (``tune run let_pretrain``), or under ``tune
run`` (a copied recipe run from another folder): the ``.pth`` file that scripts/setup.sh
writes imports letrecipes at every start of the venv's Python, so the finder is in place
before ``tune`` asks. A path with ``./`` or a leading ``/`` never reaches a finder (runpy
refuses the module name tune makes of it): a ``sys.excepthook`` says that one in a line.
"""

import difflib
import importlib.abc
import importlib.machinery
import os
import sys

from letrecipes._tune_registry import tune_command

RECIPES = ("pretrain", "let_pretrain", "eval")  # the modules of this package that tune run takes


def _closest_recipe(name: str):
    close = difflib.get_close_matches(name, RECIPES, n=1, cutoff=0.6)
    return close[0] if close else None


class _UnknownRecipeLoader(importlib.abc.Loader):
    def __init__(self, name: str):
        self.name = name

    def exec_module(self, module):  # a plain import: what Python says for a missing module
        raise ModuleNotFoundError(f"No module named {self.name!r}", name=self.name)

    def get_code(self, fullname):  # runpy's path: tune run, python -m
        package, _, wanted = fullname.rpartition(".")
        close = _closest_recipe(wanted)
        choices = ", ".join(f"letrecipes/{r}" for r in RECIPES)
        if package:
            hint = f" Did you mean letrecipes/{close}?" if close else ""
            line = (f"error: no recipe letrecipes/{wanted}.{hint} Fix: one of {choices} (or a recipe you copied with "
                    "letrecipes cp: tune run my_let --config ...).")
        elif close:  # `tune run let_pretrain`: our recipes are modules of the package, named with it
            line = (f"error: no recipe {wanted}: letrecipes' recipes are named with their package. Fix: tune run "
                    f"letrecipes/{close} --config ... (or python -m letrecipes.{close} --config ...).")
        else:  # `tune run my_lett`: a copied recipe that is not where tune looks
            line = (f"error: no recipe {wanted}: tune run found no torchtune recipe of that name and no module "
                    f"{wanted} (a {wanted}.py in the working directory, {os.getcwd()}, or an installed one). Fix: run "
                    f"from the folder of the recipe you copied, or one of {choices}.")
        return compile(f"raise SystemExit({line!r})", f"<letrecipes: no recipe {wanted}>", "exec")


def _asked_by_runpy() -> bool:
    """Whether the lookup comes from runpy (``python -m``, ``tune run``), not from an import
    or ``importlib.util.find_spec``, which must go on finding no module."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__") == "runpy"


def _started_as_tune_run() -> bool:
    """Whether this process is ``tune run ...`` (which sets ``sys.argv`` to the recipe's own)."""
    return tune_command() == "run"


class UnknownRecipeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if not name or name.startswith("_"):
            return None
        if package == "letrecipes":
            ours = True
        elif not package:
            # a top-level name: one of our recipes' without the package (any `python -m` or
            # tune run), or any name under tune run, which reports only runpy's traceback
            ours = _closest_recipe(name) is not None or _started_as_tune_run()
        else:
            ours = False
        if not ours or not _asked_by_runpy():
            return None
        return importlib.machinery.ModuleSpec(fullname, _UnknownRecipeLoader(fullname))


def _path_given_to_tune_run(dotted: str):
    """The recipe path of ``tune run PATH`` that tune turned into the module name ``dotted``."""
    return next((arg for arg in getattr(sys, "orig_argv", [])
                 if "/" in arg and os.path.splitext(arg)[0].replace("/", ".") == dotted), None)


def _a_recipe_path_is_one_line(previous):
    """``tune run ./letrecipes/let_pretrain.py`` or ``tune run /home/me/my_let.py``: tune makes a
    module name of the path, '..letrecipes.let_pretrain', and runpy refuses it before any finder
    is asked ("Relative module names not supported", a traceback). Said in one line, with
    the command that works; every other exception goes to the hook there was."""
    def hook(kind, error, traceback):
        path = _path_given_to_tune_run(sys.argv[0]) if sys.argv else None
        if not (kind is ImportError and str(error) == "Relative module names not supported" and path
                and _started_as_tune_run()):
            return previous(kind, error, traceback)
        folder, stem = os.path.split(os.path.splitext(path)[0])
        shipped = stem in RECIPES and os.path.basename(os.path.normpath(folder or ".")) == "letrecipes"
        fix = (f"tune run letrecipes/{stem} --config ... (from any folder)" if shipped else
               f"run it from its folder: cd {os.path.abspath(folder or '.')} && tune run {stem} --config ...")
        print(f"error: tune run {path}: tune takes a recipe as a module path from the working directory, without "
              f"'./' or a leading '/' (it made {sys.argv[0]!r} of it). Fix: {fix}", file=sys.stderr)  # exit status 1
    hook.previous, hook.a_recipe_path_is_one_line = previous, True
    return hook


def hook_installed(marker: str) -> bool:
    """Whether ``sys.excepthook``'s chain (each of ours keeps the one before as ``previous``)
    holds the hook marked ``marker``: an install run twice must not chain it twice."""
    hook = sys.excepthook
    while hook is not None:
        if getattr(hook, marker, False):
            return True
        hook = getattr(hook, "previous", None)
    return False


def install() -> None:
    if not any(isinstance(f, UnknownRecipeFinder) for f in sys.meta_path):
        sys.meta_path.append(UnknownRecipeFinder())
    if not hook_installed("a_recipe_path_is_one_line"):
        sys.excepthook = _a_recipe_path_is_one_line(sys.excepthook)
