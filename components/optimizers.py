"""Short names for torch's optimizers (``optimizer: {_component_: adamw, lr: 3e-4}``).

Any optimizer class works by its dotted path too (``torch.optim.AdamW``, or your own);
the recipes call it with the parameter groups first, then the section's keys.
"""

from __future__ import annotations

import torch

from letrecipes.components.registry import register

register("optimizer", "adamw")(torch.optim.AdamW)
register("optimizer", "adam")(torch.optim.Adam)
register("optimizer", "sgd")(torch.optim.SGD)
