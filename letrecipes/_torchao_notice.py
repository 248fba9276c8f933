"""Drops one message, deliberately: torchao 0.15.0's notice that it skips its C++ extensions.
(And says one thing that must be said before torch loads: see the last function.)

torchao 0.15.0 calls itself compatible with torch 2.9.1 only and otherwise skips loading its
compiled extensions, saying so on every import. letrecipes pins torch 2.13.0: a CPU wheel
of torch 2.9.1 is not in the package registries this project installs from (PyPI's 2.9.1
is the CUDA build, about 900 MB plus its CUDA libraries), and the newer torchao releases
(0.16-0.18) break torchtune 0.6.1's imports. Nothing letrecipes uses needs those extensions:
float8 training is torchao's Python and torch.compile. So the notice carries no news for a
letrecipes user and is dropped; every other torchao message still shows (docs/guide.md, "Versions").

``install()`` runs when letrecipes is imported and, through the ``.pth`` file that
scripts/setup.sh writes, at the start of every Python in the venv: ``tune run`` imports
torchao (through torchtune) before any letrecipes code runs.
"""

import logging

MESSAGE = "Skipping import of cpp extensions due to incompatible torch version"


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix``; every other passes."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def drop_message(logger_name: str, prefix: str) -> None:
    """Drop that one message of that logger (once: installing twice adds no second filter).
    letrecipes/_launcher.py drops torchrun's "no error file defined for parent" the same way."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_DropMessage(prefix))


def say_if_the_working_directory_is_gone() -> None:
    """torch cannot load in a working directory that was removed (a scratch folder purged
    while a shell stood in it, a lost mount): its own last word is "Intel oneMKL FATAL
    ERROR: Cannot load .../libtorch_cpu.so", which reads as a broken install, and it comes
    before any line of letrecipes (`tune` imports torch first). So it is said here, where
    every Python of the venv starts: one line, and Python goes on."""
    import os
    import sys

    try:
        os.getcwd()
    except FileNotFoundError:
        sys.stderr.write("warning: this process's working directory no longer exists (removed while a shell stood "
                         "in it, or its mount was lost): torch cannot load there (\"Intel oneMKL FATAL ERROR: Cannot "
                         "load ... libtorch_cpu.so\"). Fix: cd to a folder that exists, then run the command again.\n")


def install() -> None:
    drop_message("torchao", MESSAGE)
    say_if_the_working_directory_is_gone()


install()
