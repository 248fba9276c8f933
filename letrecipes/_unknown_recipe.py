"""``tune run letrecipes/<typo>`` and ``python -m letrecipes.<typo>`` answered in one line.

``tune run`` turns a recipe path it does not know into a module name and hands it to
``runpy``, which finds no such module and stops with a 15-line traceback ending in
``ImportError``. A finder placed last on ``sys.meta_path`` (so every real module is found
first) answers only names one level under ``letrecipes`` that nothing else found, and only
when runpy asks. ``runpy`` asks its loader for code, which exits with the recipes there are
and the closest one; an ``import`` of such a name still raises ``ModuleNotFoundError`` and
``importlib.util.find_spec`` gives None, as before.
"""

import difflib
import importlib.abc
import importlib.machinery
import sys

RECIPES = ("pretrain", "let_pretrain", "eval")  # the modules of this package that tune run takes


class _UnknownRecipeLoader(importlib.abc.Loader):
    def __init__(self, name: str):
        self.name = name

    def exec_module(self, module):  # a plain import: what Python says for a missing module
        raise ModuleNotFoundError(f"No module named {self.name!r}", name=self.name)

    def get_code(self, fullname):  # runpy's path: tune run, python -m
        wanted = fullname.rpartition(".")[2]
        close = difflib.get_close_matches(wanted, RECIPES, n=1, cutoff=0.6)
        hint = f" Did you mean letrecipes/{close[0]}?" if close else ""
        line = (f"error: no recipe letrecipes/{wanted}.{hint} Fix: one of "
                + ", ".join(f"letrecipes/{r}" for r in RECIPES)
                + " (or a recipe you copied with letrecipes cp: tune run my_let --config ...).")
        return compile(f"raise SystemExit({line!r})", f"<letrecipes: no recipe {wanted}>", "exec")


def _asked_by_runpy() -> bool:
    """Whether the lookup comes from runpy (``python -m``, ``tune run``), not from an import
    or ``importlib.util.find_spec``, which must go on finding no module."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__") == "runpy"


class UnknownRecipeFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != "letrecipes" or not name or name.startswith("_") or not _asked_by_runpy():
            return None
        return importlib.machinery.ModuleSpec(fullname, _UnknownRecipeLoader(fullname))


def install() -> None:
    if not any(isinstance(f, UnknownRecipeFinder) for f in sys.meta_path):
        sys.meta_path.append(UnknownRecipeFinder())
