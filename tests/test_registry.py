import re
import sys
import textwrap
from typing import Optional

import pytest
import torch

from letrecipes import components
from letrecipes.components.alignment import NegativeCosine
from letrecipes.components import registry
from letrecipes.components.registry import ComponentError, build, import_modules, register, registered


def test_builtins_are_registered_for_every_kind():
    assert {"negative_cosine", "mse", "normalized_mse", "smooth_l1"} <= set(registered("alignment_loss"))
    assert {"linear", "mlp", "interpolate", "identity"} <= set(registered("projector"))
    assert {"linear", "cosine", "constant", "step"} <= set(registered("schedule"))
    assert {"preset", "pairs"} <= set(registered("layer_map"))
    assert "letrecipes" in registered("teacher_loader")


def test_build_by_short_name_and_by_dotted_path_gives_the_same_class():
    by_name = build("alignment_loss", "negative_cosine", key="alignment.loss")
    by_path = build("alignment_loss", {"_component_": "letrecipes.components.alignment.NegativeCosine"}, key="alignment.loss")
    assert type(by_name) is type(by_path) is NegativeCosine


def test_unknown_name_error_names_key_and_choices():
    with pytest.raises(ComponentError) as err:
        build("alignment_loss", "cosine_typo", key="alignment.loss")
    assert "alignment.loss._component_" in str(err.value)
    assert "negative_cosine" in str(err.value) and "Fix" in str(err.value)


def test_bad_kwargs_are_reported_with_the_key():
    with pytest.raises(ComponentError, match="alignment.schedule"):
        build("schedule", {"_component_": "linear", "lambda_zero": 1.0}, key="alignment.schedule")


def test_registering_a_name_twice_with_another_object_fails():
    with pytest.raises(ComponentError, match="already registered by letrecipes.components.alignment.MSE. Fix: register "
                                             "letrecipes.components.alignment.NegativeCosine under another name"):
        register("alignment_loss", "mse")(NegativeCosine)


def test_a_module_imported_again_registers_its_components_again(tmp_path, monkeypatch):
    """importlib.reload in a notebook (or the module dropped from sys.modules and imported
    anew, as a test of docs/examples did before another imported it) was refused: "already
    registered" by the module's own earlier self."""
    import importlib

    (tmp_path / "my_reloaded_loss.py").write_text(textwrap.dedent("""
        from letrecipes.components.alignment import NegativeCosine
        from letrecipes.components.registry import register

        @register("alignment_loss", "my_reloaded_loss")
        class MyLoss(NegativeCosine):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        first = importlib.import_module("my_reloaded_loss")
        again = importlib.reload(first)
        assert registered("alignment_loss")["my_reloaded_loss"] is again.MyLoss
        del sys.modules["my_reloaded_loss"]
        anew = importlib.import_module("my_reloaded_loss")
        assert registered("alignment_loss")["my_reloaded_loss"] is anew.MyLoss
    finally:
        registry._REGISTRY["alignment_loss"].pop("my_reloaded_loss", None)
        sys.modules.pop("my_reloaded_loss", None)


def test_custom_loss_registered_in_a_user_module(tmp_path, monkeypatch):
    (tmp_path / "my_lab_losses.py").write_text(textwrap.dedent("""
        from letrecipes.components.alignment import AlignmentLoss
        from letrecipes.components.registry import register

        @register("alignment_loss", "test_l1")
        class L1(AlignmentLoss):
            def per_token(self, pred, target):
                return (pred - target).abs().mean(-1)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import_modules(["my_lab_losses"])
    loss = build("alignment_loss", "test_l1", key="alignment.loss")
    a, b = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
    assert loss(a, b).item() == pytest.approx(1.0)
    sys.modules.pop("my_lab_losses")


def test_a_loss_registered_itself_instead_of_what_builds_it_is_named_as_such():
    """`@register("alignment_loss", ...)` on the loss function itself (a natural first try)
    ended in `cannot build 'l2': l2() missing 2 required positional arguments: 'student' and
    'teacher'. Fix: check alignment.loss._component_ and its keys`: now the error says what a
    registered component is called with, and the fix."""
    def l2(student, teacher, scale=1.0):
        return ((student - teacher) ** 2).mean() * scale

    register("alignment_loss", "test_l2_function")(l2)
    with pytest.raises(ComponentError) as err:
        build("alignment_loss", {"_component_": "test_l2_function", "scale": 2.0}, key="alignment.loss")
    assert str(err.value) == (
        "alignment.loss: cannot build 'test_l2_function': what is registered for alignment_loss is called with the "
        "config's keys to build the component, and 'test_l2_function' needs student, teacher, which no key gives. "
        "Fix: register what builds it (a class, or a function that returns it; docs/extending.md shows each kind's "
        "interface), or set alignment.loss.student if it is a setting.")



def test_a_file_path_or_a_relative_path_where_a_module_is_named_is_said_so():
    """`imports=[docs/examples/centered_cosine.py]` (a file, as a shell names it) said "cannot
    import"; `_component_: .components.lr_schedules.warmup_cosine` (a relative path) stopped
    with importlib's TypeError traceback ("the 'package' argument is required"), found by
    damaging configs at random."""
    with pytest.raises(ComponentError, match=r"^imports: 'docs/examples/centered_cosine.py' is a file's path; imports "
                                             r"takes module names, as Python's import does. Fix: "
                                             r"imports=\[centered_cosine\], with its folder on the module path "
                                             r"\(PYTHONPATH=docs/examples tune run ...\).$"):
        registry.import_modules(["docs/examples/centered_cosine.py"])
    with pytest.raises(ComponentError, match=r"imports=\[my_losses\], \(tune run puts the working directory"):
        registry.import_modules(["my_losses.py"])
    for name in (".components.lr_schedules.warmup_cosine", "letrecipes..components.x", "my-losses.Foo"):
        with pytest.raises(ComponentError, match=rf"^lr_scheduler._component_: {re.escape(repr(name))} is not a dotted "
                                                 r"import path .* Fix: the full path from the top package, or a "
                                                 r"registered short name for lr_scheduler: warmup_constant, "):
            registry.resolve("lr_scheduler", name, "lr_scheduler._component_")
    with pytest.raises(ComponentError, match=r"^imports: '.lab' is not a dotted import path"):
        registry.import_modules([".lab"])
    assert registry.resolve("lr_scheduler", "letrecipes.components.lr_schedules.warmup_cosine") is \
        registry.resolve("lr_scheduler", "warmup_cosine")


def test_import_of_a_missing_module_names_the_key(tmp_path, monkeypatch):
    with pytest.raises(ComponentError, match="imports: cannot import 'no_such_module_xyz'"):
        import_modules(["no_such_module_xyz"])
    # the module is there; a package it imports is not: the fix is an install, not the module's path
    (tmp_path / "lab_losses_needing_a_package.py").write_text("import no_such_package_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ComponentError, match="imports: 'lab_losses_needing_a_package' imports 'no_such_package_xyz', "
                                             "which is not installed here. Fix: install it"):
        import_modules(["lab_losses_needing_a_package"])
    with pytest.raises(ComponentError, match="alignment.loss._component_: .lab_losses_needing_a_package. imports "
                                             "'no_such_package_xyz', which is not installed here"):
        build("alignment_loss", "lab_losses_needing_a_package.Loss", key="alignment.loss")


def test_package_import_registers_everything():
    assert components.alignment.NegativeCosine is NegativeCosine


def test_the_documented_custom_loss_example_trains(let_overrides, tmp_path, monkeypatch):
    """docs/examples/centered_cosine.py, used exactly as docs/extending.md shows."""
    from pathlib import Path

    from letrecipes.components.metrics import read_metrics
    from letrecipes import let_pretrain

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "docs" / "examples"))
    let_pretrain.recipe_main(["--config", "let_tiny", *let_overrides, f"output_dir={tmp_path}", "max_steps=2",
                              "imports=[centered_cosine]", "alignment.loss=centered_cosine",
                              "alignment.schedule._component_=linear", "alignment.schedule.lambda0=1.0"])
    first = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert -1.0 <= first["align_loss"] <= 1.0 and first["lambda"] == 1.0
    assert "centered_cosine" in registered("alignment_loss")


@pytest.mark.parametrize("name", [1e308, 3, {}, {"a": 1}, [], None, ""])
def test_a_component_name_that_is_not_a_name_is_one_error(name):
    """A number, a mapping or a list where a component's name belongs (a YAML slip:
    `_component_: 1e308`, an indented block under it) was an AttributeError
    ('float' object has no attribute 'startswith') or a TypeError (unhashable)."""
    with pytest.raises(registry.ComponentError, match=r"teacher._component_=.* is not a component name. Fix: a "
                                                      r"registered short name for teacher_loader \(auto, gguf, "):
        registry.resolve("teacher_loader", name, key="teacher._component_")


@pytest.mark.parametrize("optimizer, options", [
    ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1, "dampening": 0.5}),
    ("adam", {"lr": 3e-4, "weight_decay": 0.1}),
    ("torch.optim.RMSprop", {"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.01}),
    ("torch.optim.Adagrad", {"lr": 1e-2, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    # `betas: tuple[float, float]`: a list of two numbers, not "a number"
    ("torch.optim.NAdam", {"lr": 2e-3, "betas": [0.9, 0.99], "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("torch.optim.RAdam", {"lr": 1e-3, "betas": [0.9, 0.95]}),
])
def test_a_float_argument_whose_default_is_written_0_takes_a_fraction(optimizer, options):
    """torch writes `momentum: float = 0`; the check took the 0 for an int and refused
    optimizer.momentum=0.9 for SGD ("must be an integer")."""
    built = build("optimizer", {"_component_": optimizer, **options}, "optimizer", [torch.nn.Parameter(torch.zeros(2))])
    assert all(built.param_groups[0][name] == value for name, value in options.items())


def test_an_argument_annotated_int_still_refuses_a_fraction_and_a_number_refuses_text():
    def schedule(optimizer, warmup_steps: int = 0, every: "Optional[int]" = None, ratio: "float | None" = 0,
                 decay=0):
        return None

    for option, value, said in (("warmup_steps", 2.5, "an integer"), ("every", 2.5, "an integer"),
                                ("ratio", "high", "a number"), ("decay", "high", "a number")):
        with pytest.raises(ComponentError, match=rf"config key s\.{option}={value!r} must be {said} for 'f'"):
            registry.check_arguments(schedule, {option: value}, "s", "f")
    registry.check_arguments(schedule, {"every": 3, "ratio": 0.5, "decay": 0.5}, "s", "f")
    # null where the default is a number and the annotation does not take None: torch's AdamW's
    # `lr: float | Tensor = 1e-3` was "'<=' not supported between instances of 'float' and 'NoneType'"
    for option in ("decay", "warmup_steps"):
        with pytest.raises(ComponentError, match=rf"config key s\.{option}=None must be"):
            registry.check_arguments(schedule, {option: None}, "s", "f")
    registry.check_arguments(schedule, {"every": None, "ratio": None}, "s", "f")  # Optional: null is theirs
    with pytest.raises(ComponentError, match=r"config key optimizer\.lr=None must be a number for 'torch.optim.AdamW'"):
        registry.check_arguments(torch.optim.AdamW, {"lr": None}, "optimizer", "torch.optim.AdamW")
    registry.check_arguments(torch.optim.AdamW, {"foreach": None, "fused": None}, "optimizer", "torch.optim.AdamW")


def test_every_torch_optimizer_and_lr_schedule_takes_its_own_defaults_written_in_a_config():
    """A config that spells out a library's defaults (a list where the signature has a tuple)
    is never refused by the kind check, which guesses each argument's kind from them."""
    import inspect

    import torch.optim.lr_scheduler as schedules
    from torchtune.training import lr_schedulers as torchtune_schedules

    factories = [c for c in vars(torch.optim).values()
                 if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer]
    factories += [c for c in vars(schedules).values()
                  if isinstance(c, type) and issubclass(c, schedules.LRScheduler) and c is not schedules.LRScheduler]
    factories.append(torchtune_schedules.get_cosine_schedule_with_warmup)
    assert len(factories) > 20
    for factory in factories:
        defaults = {name: list(p.default) if isinstance(p.default, tuple) else p.default
                    for name, p in inspect.signature(factory).parameters.items()
                    if isinstance(p.default, (int, float, bool, str, tuple))}
        registry.check_arguments(factory, defaults, "k", factory.__name__)
