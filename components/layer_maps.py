"""Which student layer(s) align to which teacher layer(s).

Layers are numbered as in :mod:`letrecipes.components.models`: 1..L are block outputs, L (the
last) is after the final norm, 0 is the embedding output. A layer may be given as

- an int: ``3``; negative counts from the end: ``-1`` is the last layer;
- a float in (0, 1]: a fractional depth, ``0.25`` is a quarter of the way down
  (rounded to the nearest block, at least block 1);
- a letter: ``E`` (early), ``M`` (middle), ``L`` (last).

The named presets ``L2E``, ``L2M``, ``L2L``, ``M2E``, ``M2M``, ``M2L`` read
"teacher layer to student layer". L2E is the paper's best and the default.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

from letrecipes.components.errors import LetRecipesError
from letrecipes.components.registry import register

Layer = Union[int, float, str]
PRESETS = ("L2E", "L2M", "L2L", "M2E", "M2M", "M2L")


class LayerMapError(LetRecipesError):
    pass


class LayerMap:
    """Resolves (student layer, teacher layer) pairs against the two models' depths.

    Args:
        preset: one of ``PRESETS``; ignored when ``pairs`` is given.
        pairs: explicit ``[[student_layer, teacher_layer], ...]``.
        early: depth fraction that ``E`` means (default 0.25: block 2 of 6, 3 of 12).
        middle: depth fraction that ``M`` means (default 0.5).
    """

    def __init__(
        self,
        preset: str = "L2E",
        pairs: Optional[Sequence[Sequence[Layer]]] = None,
        early: float = 0.25,
        middle: float = 0.5,
    ):
        if pairs is None:
            if preset not in PRESETS:
                raise LayerMapError(
                    f"alignment.layer_map.preset: unknown preset {preset!r}. Fix: use one of "
                    f"{', '.join(PRESETS)}, or give explicit `pairs: [[student, teacher]]`."
                )
            teacher, student = preset.split("2")
            pairs = [(student, teacher)]
        if not pairs:
            raise LayerMapError("alignment.layer_map.pairs is empty. Fix: give at least one pair.")
        for pair in pairs:
            if len(pair) != 2:
                raise LayerMapError(
                    f"alignment.layer_map.pairs: {list(pair)} is not a [student, teacher] pair."
                )
        self.pairs = [tuple(p) for p in pairs]
        self.fractions = {"E": early, "M": middle, "L": 1.0}

    def _resolve_one(self, layer: Layer, depth: int, side: str) -> int:
        where = f"alignment.layer_map: {side} layer {layer!r}"
        if isinstance(layer, str):
            if layer not in self.fractions:
                raise LayerMapError(f"{where} is not E, M, L, an int or a fraction.")
            layer = self.fractions[layer]
        if isinstance(layer, bool):
            raise LayerMapError(f"{where} is a boolean; give an int, a fraction or E/M/L.")
        if isinstance(layer, float):
            if not 0.0 < layer <= 1.0:
                raise LayerMapError(f"{where}: a fractional depth must lie in (0, 1].")
            return max(1, min(depth, int(layer * depth + 0.5)))
        index = layer + depth + 1 if layer < 0 else layer
        if not 0 <= index <= depth:
            raise LayerMapError(
                f"{where} is outside the {side}'s depth: it has {depth} blocks, so valid layers "
                f"are 0..{depth} or -{depth + 1}..-1. Fix: pick a layer in range."
            )
        return index

    def resolve(self, student_depth: int, teacher_depth: int) -> List[Tuple[int, int]]:
        """Concrete ``(student_layer, teacher_layer)`` pairs, validated."""
        return [
            (
                self._resolve_one(s, student_depth, "student"),
                self._resolve_one(t, teacher_depth, "teacher"),
            )
            for s, t in self.pairs
        ]


@register("layer_map", "preset")
def preset_map(name: str = "L2E", early: float = 0.25, middle: float = 0.5) -> LayerMap:
    return LayerMap(preset=name, early=early, middle=middle)


@register("layer_map", "pairs")
def explicit_map(pairs: Sequence[Sequence[Layer]], early: float = 0.25, middle: float = 0.5) -> LayerMap:
    return LayerMap(pairs=pairs, early=early, middle=middle)


register("layer_map", "layer_map")(LayerMap)


def layer_map_spec(spec: Any, key: str = "alignment.layer_map") -> Any:
    """The component spec that the short forms of ``alignment.layer_map`` stand for: a preset
    name (``L2E``) and a list of pairs (``[[2, -1]]``); anything else is returned as it is."""
    from omegaconf import ListConfig, OmegaConf

    from letrecipes.components.registry import registered

    if isinstance(spec, ListConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, str) and spec not in registered("layer_map") and "." not in spec:
        if spec.upper() not in PRESETS:
            raise LayerMapError(f"{key}={spec!r} is neither a preset ({', '.join(PRESETS)}) nor a layer_map "
                                "component. Fix: a preset, pairs like [[2, -1]] (student block 2 <- the teacher's "
                                "last layer), or your own component (docs/extending.md).")
        return {"_component_": "preset", "name": spec.upper()}
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in spec):
            raise LayerMapError(f"{key}={spec!r}: a list of layer pairs holds [student_layer, teacher_layer] "
                                "pairs. Fix: e.g. [[2, -1]] (student block 2 <- the teacher's last layer) or "
                                "[[2, L], [4, L]].")
        return {"_component_": "pairs", "pairs": [list(pair) for pair in spec]}
    return spec
