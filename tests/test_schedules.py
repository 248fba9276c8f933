import math

import pytest

from letrecipes.components.registry import build
from letrecipes.components.schedules import Constant, CosineDecay, LinearDecay, StepCutoff


def test_linear_decay_matches_the_paper_formula():
    s = LinearDecay(lambda0=0.1, stop=100)
    assert [s(0), s(50), s(99), s(100), s(1000)] == pytest.approx([0.1, 0.05, 0.001, 0.0, 0.0])
    assert s.end_step == 100


def test_stop_as_a_fraction_of_the_run():
    assert LinearDecay(lambda0=1.0, stop=0.25, total_steps=400).end_step == 100
    assert build("schedule", {"_component_": "linear", "stop": 0.5}, key="s", total_steps=300).end_step == 150


def test_cosine_step_and_constant():
    c = CosineDecay(lambda0=2.0, stop=10)
    assert [c(0), c(5), c(10), c(11)] == pytest.approx([2.0, 1.0, 0.0, 0.0])
    assert c(3) == pytest.approx(1.0 + math.cos(math.pi * 0.3))
    st = StepCutoff(lambda0=0.3, stop=5)
    assert [st(0), st(4), st(5)] == [0.3, 0.3, 0.0]
    k = Constant(lambda0=0.5)
    assert k(0) == k(10**6) == 0.5 and k.end_step is None
    assert Constant(lambda0=0.0).end_step == 0


def test_default_lambda0_is_the_papers():
    assert LinearDecay(stop=10).lambda0 == 0.1


@pytest.mark.parametrize("stop, total, message", [
    (1.5, 100, r"\(0, 1\]"), (0, 100, ">= 1 step"), (0.5, None, "total_steps is unknown"), ("10", 100, "steps \\(int\\)"),
])
def test_bad_stop_values(stop, total, message):
    with pytest.raises(ValueError, match=message):
        LinearDecay(stop=stop, total_steps=total)


def test_negative_lambda0_is_rejected():
    with pytest.raises(ValueError, match="lambda0"):
        LinearDecay(lambda0=-1.0, stop=10)


def test_the_documented_custom_schedule_example(monkeypatch):
    """docs/examples/warmup_decay.py, as docs/extending.md shows it."""
    import sys
    from pathlib import Path

    from letrecipes.components.registry import import_modules

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "docs" / "examples"))
    import_modules(["warmup_decay"])
    schedule = build("schedule", {"_component_": "warmup_decay", "lambda0": 1.0, "stop": 0.5, "warmup": 4},
                     key="alignment.schedule", total_steps=20)
    values = [schedule(step) for step in range(12)]
    assert values[:5] == [0.2, 0.4, 0.6, 0.8, 1.0] and schedule.end_step == 10
    assert values[4:10] == sorted(values[4:10], reverse=True) and values[10:] == [0.0, 0.0]
    sys.modules.pop("warmup_decay")
