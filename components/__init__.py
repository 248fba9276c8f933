"""Interchangeable parts of a LET pretraining run (installed as ``letrecipes.components``).

Importing the package is cheap: the built-in components register themselves the first
time the registry is asked for a name (``registry.load_builtins``), so a process that only
reads corpora never imports torch. Modules import ``registry``, ``errors`` and the modules
whose objects they use, so any module can be imported first.
"""
