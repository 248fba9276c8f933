"""``tune ls``, ``tune cp`` and ``tune cat`` know letrecipes' recipes and configs.

torchtune's commands look names up in its own list of recipes (``torchtune._recipe_registry``),
so ``tune cp letrecipes/let_pretrain my_let.py`` - the torchtune way to copy a recipe and edit
it - answered "Invalid file name", and ``tune ls`` did not show ours. In a process started as
one of those three commands, our recipes are added to that list as it is imported (an import
hook: nothing is imported before tune imports it), each with its configs:

    letrecipes/let_pretrain      let_1b4, let_7b, let_tiny, ...
    letrecipes/pretrain          pretrain_tiny, baseline_tiny, ...
    letrecipes/eval              eval, eval_let_paper

``tune run`` is left as it was: it finds our recipes as modules (``letrecipes/let_pretrain``)
and our configs by name through the recipe itself, and a registered recipe would instead be
run as a file. Like the other hooks, installed by ``import letrecipes``, which the ``.pth``
file of scripts/setup.sh runs at the start of every Python in the venv.
"""

import importlib.abc
import importlib.machinery
import os
import sys

REGISTRY = "torchtune._recipe_registry"
COMMANDS = ("ls", "cp", "cat")


def tune_command():
    """The subcommand this process was started as (``tune cp ...``: "cp"), or None when it is
    not ``tune`` (its command line, not ``sys.argv``, which ``tune run`` sets to the recipe's)."""
    argv = getattr(sys, "orig_argv", [])
    return next((argv[i + 1] for i, arg in enumerate(argv[:-1])
                 if arg == "torchtune._cli.tune" or os.path.basename(arg) == "tune"), None)


def recipe_of(config: dict) -> str:
    """Which of our recipes a config is for: an eval config, a config with a teacher (LET), or
    plain pretraining."""
    if "tasks" in config and "checkpoint" in config and "model" not in config:
        return "eval"
    return "let_pretrain" if "teacher" in config else "pretrain"


def our_recipes():
    """Our recipes as torchtune lists recipes, with each shipped config under its recipe."""
    import yaml
    from torchtune._recipe_registry import Config, Recipe

    from letrecipes._config import config_dirs
    from letrecipes._unknown_recipe import RECIPES

    configs = {name: [] for name in RECIPES}
    seen = set()
    for folder in config_dirs():
        for path in sorted(folder.glob("*.yaml")):
            if path.stem in seen:
                continue
            seen.add(path.stem)
            try:
                config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (OSError, ValueError, yaml.YAMLError):  # a damaged config is for `tune run` to name, not `tune ls`
                continue
            if isinstance(config, dict):
                # an absolute file_path: torchtune joins it to its own folder, which leaves it as it is
                configs[recipe_of(config)].append(Config(name=path.stem, file_path=str(path.resolve())))
    here = os.path.dirname(os.path.abspath(__file__))
    return [Recipe(name=f"letrecipes/{name}", file_path=os.path.join(here, f"{name}.py"), configs=configs[name],
                   supports_distributed=name != "eval") for name in RECIPES]


class _AddOursToTunesRegistry(importlib.abc.MetaPathFinder):
    """Finds torchtune's registry module as Python would, and adds our recipes once it has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != REGISTRY:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            try:
                module._ALL_RECIPES.extend(our_recipes())
            except Exception as err:  # tune goes on with its own recipes, saying why ours are missing
                print(f"warning: letrecipes' recipes are not listed by tune ({type(err).__name__}: {err}); "
                      "`letrecipes ls` / `letrecipes cp` list and copy them.", file=sys.stderr)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if tune_command() in COMMANDS and REGISTRY not in sys.modules and not any(
            isinstance(finder, _AddOursToTunesRegistry) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AddOursToTunesRegistry())
