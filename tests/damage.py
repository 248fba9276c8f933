"""Damage for the tests that feed the loaders what a hand edit, a converter or a bad
merge leaves in a JSON file: one value of the wrong kind, a key gone, a number scaled,
a name changed. The files still parse; what they say is wrong."""
import copy
import random
from typing import Any, List, Tuple

WRONG_VALUES = [None, True, False, 0, -1, 1, 2**63, 1e308, float("nan"), -0.5, "", "x", "../x", "/etc/passwd",
                [], [1], {}, {"a": 1}, "\u00e9\x00"]


def _places(value: Any, where: Tuple = ()) -> List[Tuple]:
    places = [where] if where else []
    if isinstance(value, dict):
        for key, inner in value.items():
            places += _places(inner, where + (key,))
    elif isinstance(value, list):
        for i, inner in enumerate(value[:20]):
            places += _places(inner, where + (i,))
    return places


def changed_json(value: Any, rng: random.Random) -> Tuple[Any, Tuple, str]:
    """A copy of ``value`` (parsed JSON) with one place changed; the place and how."""
    value = copy.deepcopy(value)
    where = rng.choice(_places(value))
    parent = value
    for key in where[:-1]:
        parent = parent[key]
    old, how = parent[where[-1]], rng.choice(["wrong", "wrong", "delete", "scale"])
    if how == "delete":
        del parent[where[-1]]
    elif how == "scale" and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[where[-1]] = rng.choice([old * 1000, -old, old + 1, 0, old * 0.5])
    elif how == "scale" and isinstance(old, str):
        parent[where[-1]] = rng.choice([old + "x", old.upper(), old[:1], ""])
    else:
        parent[where[-1]] = rng.choice(WRONG_VALUES)
    return value, where, how
