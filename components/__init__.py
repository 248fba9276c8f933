"""Interchangeable parts of a LET pretraining run.

Importing this package registers every built-in component under its short name, so
``components.registry.build("alignment_loss", "negative_cosine")`` works after a plain
``import components``.
"""

from components import (  # noqa: F401  (imported for their registrations)
    alignment,
    layer_maps,
    projectors,
    schedules,
    teachers,
)
