"""letrecipes: Late-to-Early Training recipes. Run them with `tune run letrecipes/<recipe>`."""

__version__ = "0.1.0"

from letrecipes import _torchao_notice  # noqa: E402,F401  (one known torchao notice, dropped: see the module)
from letrecipes import _unknown_recipe  # noqa: E402  (`tune run letrecipes/<typo>`: one line, not a traceback)
from letrecipes import _launcher  # noqa: E402  (a failed multi-process run: its ranks' errors, not a traceback)
from letrecipes import _tune_registry  # noqa: E402  (`tune ls` / `tune cp` / `tune cat` list and copy ours)
from letrecipes import _start_failures  # noqa: E402  (what the machine lacks at the first imports: one line)

_unknown_recipe.install()
_launcher.install()
_tune_registry.install()
_start_failures.install()
