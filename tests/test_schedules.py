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


# ----------------------------------------------------------------- learning-rate schedules
def _lr_curve(name, steps, **options):
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build("lr_scheduler", {"_component_": name, **options}, "lr_scheduler", optimizer, total_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("name, options, expected", [
    ("warmup_cosine", {"warmup_steps": 2, "min_lr_ratio": 0.0},
     [0.5, 1, 1] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(1, 8)]),
    ("warmup_linear", {"warmup_steps": 2}, [0.5, 1, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]),
    ("warmup_stable_decay", {"warmup_steps": 2, "decay_fraction": 0.4}, [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]),
    ("warmup_stable_decay", {"warmup_steps": 2, "decay_fraction": 0.4, "decay": "sqrt", "min_lr_ratio": 0.1},
     [0.5, 1, 1, 1, 1, 1, 1] + [0.1 + 0.9 * (1 - math.sqrt(k / 4)) for k in (1, 2, 3)]),
    ("warmup_constant", {"warmup_steps": 2}, [0.5] + [1.0] * 9),
], ids=["cosine", "linear", "wsd", "wsd-sqrt", "constant"])
def test_learning_rate_schedules_by_short_name(name, options, expected):
    assert _lr_curve(name, 10, **options) == pytest.approx(expected)


def test_a_wsd_decay_of_a_fraction_of_a_step_is_rounded_up():
    """1.2 steps of decay are 2 (a rate of 0.5 at the last step), not 1 (no step below the full rate)."""
    rates = _lr_curve("warmup_stable_decay", 100, warmup_steps=0, decay_fraction=0.012)
    assert rates[:99] == pytest.approx([1.0] * 99) and rates[99] == pytest.approx(0.5)


@pytest.mark.parametrize("options, said", [
    ({"decay_fraction": 0}, "lr_scheduler.decay_fraction=0 must be in (0, 1]"),
    ({"decay": "exp"}, "lr_scheduler.decay='exp' must be one of cosine, linear, sqrt"),
    ({"min_lr_ratio": 2}, "lr_scheduler.min_lr_ratio=2 must be in [0, 1]"),
])
def test_a_wsd_schedule_that_cannot_be_is_one_line(options, said):
    from letrecipes.components.registry import ComponentError

    with pytest.raises(ComponentError, match=None) as err:
        _lr_curve("warmup_stable_decay", 10, warmup_steps=1, **options)
    assert said in str(err.value), err.value
