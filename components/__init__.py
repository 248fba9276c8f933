"""Interchangeable parts of a LET pretraining run (installed as ``letrecipes.components``).

Importing this package registers every built-in component under its short name, so
``registry.build("alignment_loss", "negative_cosine", key=...)`` works after any
``import letrecipes.components...``. Modules only import ``registry``, ``errors`` and the
modules whose objects they use, never this package's ``__init__`` for its side effects,
so any module can be imported first.
"""

from letrecipes.components import (  # noqa: F401  (imported for their registrations)
    alignment,
    gguf_teacher,
    hf_teacher,
    layer_maps,
    letrecipes_teacher,
    lr_schedules,
    optimizers,
    models,
    projectors,
    schedules,
    teachers,
)
