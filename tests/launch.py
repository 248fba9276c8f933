"""Starting a recipe in processes of its own, the way `tune run` starts it.

`tune run letrecipes/pretrain ...` runs the recipe file in its own process (runpy) or, with
`--nproc_per_node N`, hands the file to torchrun. tests/test_cli.py and one multi-process
test go through `tune` itself; the other tests start the same file the same two ways
without it, because importing torchtune's command line costs about 4 s a launch on 2
cores (a 2-process launch: 11.0 s through `tune`, 7.3 s straight to torchrun) and the suite
launches about a hundred runs.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def compiles_under_this_locale() -> bool:
    """torch's compiler opens its own UTF-8 templates in the locale's encoding: under EUC-JP,
    say, compile=true is one line naming the locale (components/parallel.py), and a test that
    compiles cannot run. ISO-8859-1 reads any byte, and compiles."""
    import locale

    import torch

    encoding = locale.getpreferredencoding(False)
    for template in (Path(torch.__file__).parent / "_inductor").rglob("*.jinja"):
        try:
            template.read_text(encoding=encoding)
        except (UnicodeDecodeError, LookupError):
            return False
    return True


def needs_compile(test):
    """Skip ``test`` where torch cannot compile for the locale's sake (said once, in the reason)."""
    import pytest

    return pytest.mark.skipif(not compiles_under_this_locale(), reason="torch's compiler cannot read its own files "
                              "under this locale's encoding")(test)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recipe_command(recipe: str, *args: str, nproc: int = 1, nnodes: int = 1, port: int = 0,
                   via_tune: bool = False, max_restarts: int = 0) -> list:
    """The command line that runs ``letrecipes/<recipe>.py`` with ``args`` (``--config`` and
    overrides) in one process or ``nproc``, rendezvousing on 127.0.0.1 on a free port (or
    ``port``: the one each of ``nnodes`` launchers, one per pretended node, must share);
    ``max_restarts``: torchrun starts the job again that many times when a process fails."""
    several = nproc > 1 or nnodes > 1
    launcher = ["--nnodes", str(nnodes)] if nnodes > 1 else []
    launcher += ["--max-restarts", str(max_restarts)] if max_restarts else []
    launcher += ["--nproc_per_node", str(nproc), "--rdzv_backend", "c10d",
                 "--rdzv_endpoint", f"127.0.0.1:{port or free_port()}"] if several else []
    if via_tune:
        return [sys.executable, "-m", "torchtune._cli.tune", "run", *launcher, f"letrecipes/{recipe}", *args]
    if several:
        return [sys.executable, "-m", "torch.distributed.run", *launcher, str(REPO / "letrecipes" / f"{recipe}.py"),
                *args]
    return [sys.executable, "-m", f"letrecipes.{recipe}", *args]
