"""One registry for every kind of swappable component, and the one way the recipes build them.

Every part a config names (model, optimizer, LR scheduler, teacher format, layer map,
projector, alignment loss, schedule) is built by :func:`build`, by a short registered name
or by a dotted import path::

    alignment:
      loss:
        _component_: negative_cosine            # short name, registered below
    # or
        _component_: letrecipes.components.alignment.NegativeCosine
    # or a class of your own, in a module of your own:
        _component_: my_lab.losses.CenteredCosine

Register your own under a short name with the decorator, and list the module under the
config's top-level ``imports:`` so that the recipe imports it (and so registers it)
before building anything::

    @register("alignment_loss", "centered_cosine")
    class CenteredCosine(AlignmentLoss): ...
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
import types
import typing
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from letrecipes.components.errors import LetRecipesError, closest_name, in_words

KINDS = ("model", "optimizer", "lr_scheduler", "teacher_loader", "layer_map", "projector", "alignment_loss", "pooling",
         "schedule")
# Components lived in a top-level package `components` before 0.2; a config that still
# names one gets the new name instead of an import error.
OLD_PREFIX, NEW_PREFIX = "components.", "letrecipes.components."

_REGISTRY: Dict[str, Dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}
# The modules whose @register decorators define the built-in short names. They are imported
# the first time a name is looked up, not when the package is imported, so that light users
# of a component (the prepare step's worker processes, `letrecipes ls`) do not pay for torch.
BUILTIN_MODULES = ("alignment", "auto_weight", "cross_tokenizer", "gguf_teacher", "hf_teacher", "layer_maps",
                   "letrecipes_teacher", "lr_schedules", "models", "optimizers", "projectors", "schedules", "teachers")
_builtins_loaded = False


def load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for name in BUILTIN_MODULES:
            importlib.import_module(f"letrecipes.components.{name}")


class ComponentError(LetRecipesError):
    """A component named in a config cannot be found or built."""


def register(kind: str, name: str) -> Callable[[Callable], Callable]:
    """Decorator: make ``obj`` buildable as ``_component_: <name>`` for this ``kind``."""
    if kind not in _REGISTRY:
        raise ComponentError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")

    def decorator(obj: Callable) -> Callable:
        existing = _REGISTRY[kind].get(name)
        # the same definition again is its module imported anew (importlib.reload in a notebook, an
        # edited file run again): it replaces the old one; before, the second import was refused
        if existing is not None and existing is not obj and _defined_at(existing) != _defined_at(obj):
            raise ComponentError(f"{kind} {name!r} is already registered by {_defined_at(existing)}. Fix: register "
                                 f"{_defined_at(obj)} under another name.")
        _REGISTRY[kind][name] = obj
        return obj

    return decorator


def _defined_at(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def registered(kind: str) -> Dict[str, Callable[..., Any]]:
    """The short names registered for ``kind`` (a copy), built-ins included."""
    load_builtins()
    return dict(_REGISTRY[kind])


def _missing_dependency(module: str, err: ImportError) -> Optional[str]:
    """'x imports y, which is not installed' when the module was found and what it imports
    was not (the fix is an install, not the module's path); None otherwise."""
    missing = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
    if not missing or module == missing or module.startswith(missing + ".") or missing.startswith(module + "."):
        return None
    return (f"{module!r} imports {missing!r}, which is not installed here. Fix: install it into this environment "
            "(pip install ... -c constraints.txt, so that torch stays as it is)")


def _check_dotted_path(name: str, key: str, instead: str) -> None:
    """A path that Python's import cannot take (``.components.x``, ``a..b``, ``my-losses``,
    a space) is named as such, not as importlib's TypeError or a module missing."""
    if not all(part.isidentifier() for part in name.split(".")):
        raise ComponentError(f"{key}: {name!r} is not a dotted import path (Python names joined by dots, as "
                             f"letrecipes.components.lr_schedules.warmup_cosine; relative paths are not taken). "
                             f"Fix: the full path from the top package, or {instead}.")


def import_modules(modules: Iterable[str] | None) -> None:
    """Import user modules so that their ``@register`` decorators run. The working directory
    is searched last, as ``tune run`` searches it: ``letrecipes validate`` (a console script,
    whose module path holds no working directory) refused ``imports=[my_loss]`` beside the
    config that ``tune run`` took."""
    if modules and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for module in modules or []:
        if "/" in str(module) or os.sep in str(module) or str(module).endswith(".py"):  # a file, as a shell names it
            file = Path(str(module))
            where = "(tune run puts the working directory on the module path)" if str(file.parent) in ("", ".") \
                else f"with its folder on the module path (PYTHONPATH={file.parent} tune run ...)"
            raise ComponentError(f"imports: {str(module)!r} is a file's path; imports takes module names, as Python's "
                                 f"import does. Fix: imports=[{file.stem}], {where}.")
        _check_dotted_path(str(module), "imports", f"remove {module!r} from `imports`")
        try:
            importlib.import_module(module)
        except ImportError as err:
            dependency = _missing_dependency(module, err)
            raise ComponentError(
                f"imports: {dependency}, or remove {module!r} from `imports`." if dependency else
                f"imports: cannot import {module!r} ({err}). Fix: make the module importable "
                "from the working directory or the environment, or remove it from `imports`."
            ) from err
        except LetRecipesError:
            raise
        except Exception as err:  # the module's own code failed while it was imported
            raise ComponentError(f"imports: importing {module!r} failed: {_where(err)}. Fix: correct that module, "
                                 "or remove it from `imports`.") from err


# Argument names as Hugging Face configs, nanoGPT, Meta's Llama code and schedulers spell them,
# against the names a component here may take: spelling alone finds nothing for
# `hidden_size` (embed_dim) or `n_layer` (num_layers). Only a name the component takes is offered.
ARGUMENT_NAMES: Dict[str, tuple] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "dim", "model_dim", "emb_dim", "n_embed"),
                    ("embed_dim", "hidden_dim")),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "layers", "depth"), ("num_layers",)),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "heads"), ("num_heads",)),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "n_kv_head", "num_kv_groups", "kv_heads"), ("num_kv_heads",)),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "ffn_hidden_size", "mlp_dim", "d_ff", "ffn_hidden_dim"),
                    ("intermediate_dim", "hidden_dim")),
    **dict.fromkeys(("max_position_embeddings", "block_size", "context_length", "seq_len", "max_seq_length"),
                    ("max_seq_len",)),
    **dict.fromkeys(("rope_theta", "rope_freq_base", "theta"), ("rope_base",)),
    **dict.fromkeys(("rms_norm_eps", "layer_norm_eps", "norm_epsilon", "layernorm_epsilon"), ("norm_eps",)),
    **dict.fromkeys(("tie_embeddings", "tie_word_embedding", "share_embeddings"), ("tie_word_embeddings",)),
    **dict.fromkeys(("initializer_range", "init_range", "std"), ("init_std",)),
    **dict.fromkeys(("learning_rate", "max_lr", "peak_lr"), ("lr",)),
    **dict.fromkeys(("num_warmup_steps", "warmup_iters", "warmup", "lr_warmup_steps"), ("warmup_steps",)),
    **dict.fromkeys(("final_lr_ratio", "min_lr_rate", "final_lr_fraction"), ("min_lr_ratio",)),
    **dict.fromkeys(("adam_epsilon", "epsilon"), ("eps",)),
}

# where a value the recipe passes to a component comes from, for the error that says so
RUN_LENGTHS = ("total_steps", "num_training_steps")  # a schedule's length, by the names schedules give it
RECIPE_SETS = {**dict.fromkeys(RUN_LENGTHS, ", from max_steps"),
               "vocab_size": ", from the tokenizer or model.vocab_size",
               "student_dim": ", the student's width", "teacher_dim": ", the teacher's width",
               "max_seq_len": ", from data.seq_len or model.max_seq_len"}
RECIPE_FIX = dict.fromkeys(RUN_LENGTHS, " and set max_steps (the schedule spans the run)")

SIMPLE_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def signature(factory: Callable[..., Any]) -> inspect.Signature:
    """``inspect.signature``, except that a module class without an ``__init__`` of its own
    (``class MyLoss(AlignmentLoss)``) takes no options: its signature is torch's
    ``Module.__init__(*args, **kwargs)``, which would pass any key and fail at build time."""
    if isinstance(factory, type) and "torch" in sys.modules:
        import torch

        if issubclass(factory, torch.nn.Module) and factory.__init__ is torch.nn.Module.__init__:
            return inspect.Signature()
    return inspect.signature(factory)


def kind_of(factory: Callable[..., Any]) -> Optional[str]:
    """The kind under which ``factory`` is registered (None: a dotted path of the user's)."""
    return next((kind for kind, built in _REGISTRY.items() if any(f is factory for f in built.values())), None)


def named_arguments(parameters: Mapping[str, inspect.Parameter]) -> List[str]:
    """The arguments that can be given by name."""
    return [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


# arguments the recipe passes itself (the parameters, the optimizer, the run's length, the widths
# a projector maps between): never the key a user meant
FILLED_BY_THE_RECIPE = {"params", "optimizer", *RUN_LENGTHS, "student_dim", "teacher_dim"}


def others_taking(factory: Callable[..., Any], option: str) -> List[str]:
    """The short names of the other components of ``factory``'s kind that take ``option``."""
    def takes(built):
        try:
            return option in named_arguments(signature(built).parameters)
        except (TypeError, ValueError):
            return False

    return [other for other, built in _REGISTRY.get(kind_of(factory), {}).items() if built is not factory and takes(built)]


def check_arguments(factory: Callable[..., Any], options: Mapping[str, Any], key: str, name: str) -> None:
    """Refuse, before the component runs, a key it does not take (with the closest one it
    does) and a value of another kind than its default or plain annotation (a string for
    a float, a list of the wrong length): library code would otherwise fail later, on the
    first step, with a traceback that names no key. Components taking ``**kwargs`` accept
    any key; their values are still checked against the arguments they name."""
    try:
        parameters = signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = named_arguments(parameters)
    for option, value in options.items():
        if option not in parameters:
            if open_ended:
                continue
            shown = str(value).lower() if isinstance(value, bool) else value
            meant = [n for n in ARGUMENT_NAMES.get(option, ()) if n in named]
            others = [] if meant else others_taking(factory, option)  # `hidden_dim` to the linear projector: mlp's
            settable = [n for n in named if n not in FILLED_BY_THE_RECIPE]
            guess = None if meant or others else closest_name(option, settable)
            close = meant or ([guess] if guess else [])
            hint = (f" Did you mean {key}.{close[0]}? ({option} is what other libraries call it.)" if meant
                    else f" Did you mean {key}.{close[0]}?" if close
                    else f" {in_words(others[:3])} take{'s' if len(others) == 1 else ''} it: "
                         f"{key}._component_={others[0]} {key}.{option}={shown}." if others else "")
            # switching _component_ on the command line keeps the keys the config file gave the old one
            fix = (f"replace it with {key}.{meant[0]}={shown}" if meant else
                   f"correct or remove it (if the config file sets it: ~{key}.{option} on the command line removes it)")
            takes = f"it takes: {', '.join(named)}" if named else "it takes no options"
            raise ComponentError(f"config key {key}.{option} is not an argument of {name!r} ({takes}).{hint} "
                                 f"Fix: {fix}.")
        problem = _kind_problem(value, parameters[option])
        if problem:
            fix = f"set {key}.{option} to {problem}"
            if problem == "an integer" and isinstance(value, float) and value.is_integer():  # YAML's 1e2 is a float
                fix = f"write it as {key}.{option}={int(value)} (YAML reads 1e2 or {int(value)}.0 as a float)"
            text = text_of_a_value(f"{key}.{option}", value, lambda v: _kind_problem(v, parameters[option]) is None)
            if text:
                raise ComponentError(f"config key {key}.{option}={value!r} must be {problem} for {name!r}: {text}")
            raise ComponentError(f"config key {key}.{option}={value!r} must be {problem} for {name!r}. Fix: {fix}.")


def _scalar_in(text: str) -> Any:
    """The number or boolean YAML would read from ``text`` unquoted; None for anything else."""
    said = text.strip()
    if said.lower() in ("true", "false"):
        return said.lower() == "true"
    for kind in (int, float):
        try:
            return kind(said)
        except ValueError:
            pass
    return None


def text_of_a_value(key: str, value: Any, takes: Callable[[Any], bool]) -> Optional[str]:
    """For text that reads as a value ``key`` takes ('100', '1e-3', 'true'): where such text
    comes from and the fix; None for anything else. It was refused as "must be an integer"
    beside a value that looks like one."""
    meant = _scalar_in(value) if isinstance(value, str) else None
    if meant is None or not takes(meant):
        return None
    shown = str(meant).lower() if isinstance(meant, bool) else value.strip()
    return ("it is text: YAML keeps a value in quotes as text, and ${oc.env:NAME} always gives text. Fix: write it "
            f"without quotes, {key}={shown}; from an environment variable, {key}='${{oc.decode:${{oc.env:NAME}}}}'.")


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _kind_problem(value: Any, parameter: inspect.Parameter) -> Optional[str]:
    """What ``value`` should be, if it is not what ``parameter`` takes; None if it may be."""
    default = None if parameter.default is inspect.Parameter.empty else parameter.default
    annotation = parameter.annotation if isinstance(parameter.annotation, (str, type)) else None
    annotation = getattr(annotation, "__name__", annotation)
    plain = SIMPLE_TYPES.get(annotation)  # `int`, not `Optional[int]`: None is no value of it
    if value is None:  # "the library's own choice", where the argument takes None
        refused = plain is not None and (parameter.default is inspect.Parameter.empty or default is not None)
        if plain is None and isinstance(default, (int, float)) and not _admits_none(parameter.annotation):
            # lr: float | Tensor = 1e-3 (torch's AdamW): null was "'<=' not supported between 'float' and 'NoneType'"
            return _KIND_NAMES[bool if isinstance(default, bool) else float]
        return _KIND_NAMES[plain] if refused else None
    expected = _expected_kind(parameter)
    if expected is bool:
        return None if isinstance(value, bool) else "true or false"
    if expected is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if expected is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if expected is str:
        return None if isinstance(value, str) else "a string"
    if isinstance(default, (tuple, list)) and default and all(isinstance(v, (int, float)) for v in default):
        ok = (isinstance(value, (tuple, list)) and len(value) == len(default)
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
        return None if ok else f"a list of {len(default)} numbers, like {list(default)}"
    return None


def _expected_kind(parameter: inspect.Parameter) -> Optional[type]:
    """The plain kind an argument takes, if one is known. What the annotation says comes first,
    then the default's kind, and a default of 0 says "a number" unless it is annotated int:
    libraries write `momentum: float = 0` (torch's SGD, and `weight_decay: float | Tensor = 0`),
    and taking the 0 for an int refused momentum=0.9."""
    default = None if parameter.default is inspect.Parameter.empty else parameter.default
    annotation = parameter.annotation if isinstance(parameter.annotation, (str, type)) else None
    plain = SIMPLE_TYPES.get(getattr(annotation, "__name__", annotation))
    expected = plain or _annotated_number(parameter.annotation) or (type(default) if default is not None else None)
    return float if expected is int and plain is not int and type(default) is int else expected


def as_numbers(factory: Callable[..., Any], options: Mapping[str, Any], key: str) -> Dict[str, Any]:
    """``options`` with each integer past 64 bits given for an argument that takes a number
    made the float it writes: YAML reads ``eps: 99999999999999999999`` as such an integer, which
    reached torch's kernels as an int and ended the first step in an OverflowError traceback.
    Smaller integers stay as written (torch takes them; errors then echo the user's value)."""
    try:
        parameters = signature(factory).parameters
    except (TypeError, ValueError):
        return dict(options)
    out = dict(options)
    for option, value in options.items():
        if option in parameters and isinstance(value, int) and not isinstance(value, bool) and \
                abs(value) >= 2**63 and _expected_kind(parameters[option]) is float and \
                not _takes_int(parameters[option]):
            try:
                out[option] = float(value)
            except OverflowError:
                raise ComponentError(f"config key {key}.{option}={value} is past the largest number (about 1.8e308). "
                                     f"Fix: set {key}.{option} to the number meant.") from None
    return out


def _takes_int(parameter: inspect.Parameter) -> bool:
    """Whether an argument says it takes an int as such (``stop: Union[int, float]``: a number
    of steps, where a float is a fraction; an unannotated default of 0): its integers stay."""
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return type(parameter.default) is int
    if isinstance(annotation, str):
        return bool(re.search(r"\bint\b", annotation))
    return annotation is int or int in typing.get_args(annotation)


def _admits_none(annotation: Any) -> bool:
    """Whether an annotation takes None (``Optional[float]``, ``float | None``); a missing
    one says nothing against it... unless its default says a number (the caller's rule)."""
    if annotation is inspect.Parameter.empty:
        return False
    if isinstance(annotation, str):
        return "None" in annotation or "Optional" in annotation
    return type(None) in typing.get_args(annotation)


def _annotated_number(annotation: Any) -> Optional[type]:
    """float for an annotation that takes a float among other kinds (``float | Tensor``,
    ``Optional[float]``, or the same as a string), int for one that takes an int and no float."""
    if isinstance(annotation, str):  # a union of plain kinds only: `tuple[float, float]` is no number
        if "[" in annotation.replace("Optional[", "").replace("Union[", ""):
            return None
        names = set(re.findall(r"\b(int|float)\b", annotation))
    elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
        names = {getattr(kind, "__name__", None) for kind in typing.get_args(annotation)}
    else:
        return None
    return float if "float" in names else int if "int" in names else None


def _where(err: BaseException) -> str:
    """``ZeroDivisionError: division by zero (at mymodule.py:3)``: the error and its last frame."""
    frames = traceback.extract_tb(err.__traceback__)
    place = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{place}"


def resolve(kind: str, name: str, key: str = "_component_") -> Callable[..., Any]:
    """Find a component by short name (``kind``'s registry) or by dotted path."""
    load_builtins()
    if not isinstance(name, str) or not name:  # a number or a mapping where a name belongs (a YAML slip)
        raise ComponentError(f"{key}={name!r} is not a component name. Fix: a registered short name for {kind} "
                             f"({', '.join(sorted(_REGISTRY[kind]))}) or the dotted path of your own.")
    if name in _REGISTRY[kind]:
        return _REGISTRY[kind][name]
    if _renamed(name):
        raise ComponentError(
            f"{key}: {name!r} is the name from before components moved into the letrecipes package. "
            f"Fix: use {NEW_PREFIX + name[len(OLD_PREFIX):]!r}{_short_name_hint(kind, name)}."
        )
    if "." in name:
        _check_dotted_path(name, key, f"a registered short name for {kind}: {', '.join(sorted(_REGISTRY[kind]))}")
        module_name, _, attr = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            dependency = _missing_dependency(module_name, err)
            raise ComponentError(
                f"{key}: {dependency}." if dependency else
                f"{key}: cannot import module {module_name!r} for {kind} {name!r} ({err}). "
                "Fix: check the dotted path, or use a registered short name: "
                f"{', '.join(sorted(_REGISTRY[kind]))}."
            ) from err
        if not hasattr(module, attr):
            raise ComponentError(
                f"{key}: module {module_name!r} has no attribute {attr!r}. Fix: check the spelling."
            )
        return getattr(module, attr)
    raise ComponentError(
        f"{key}: unknown {kind} {name!r}. Fix: use one of "
        f"{', '.join(sorted(_REGISTRY[kind]))}, a dotted path to your own class, or register "
        "yours with @letrecipes.components.registry.register and list its module under `imports`."
    )


def _renamed(name: str) -> bool:
    """True if ``name`` is one of ours under its pre-0.2 path; a user's own ``components``
    package (``components.my_losses.Foo``) is left alone."""
    if not name.startswith(OLD_PREFIX) or name.count(".") < 2:
        return False
    module_name, _, attr = (NEW_PREFIX + name[len(OLD_PREFIX):]).rpartition(".")
    try:
        return importlib.util.find_spec(module_name) is not None and hasattr(importlib.import_module(module_name), attr)
    except ImportError:
        return False


def _short_name_hint(kind: str, name: str) -> str:
    attr = name.rpartition(".")[2]
    short = [n for n, obj in _REGISTRY[kind].items() if getattr(obj, "__name__", None) == attr]
    return f" (or the short name {short[0]!r})" if short else ""


def build(kind: str, spec: Any, key: str, *args: Any, **kwargs: Any) -> Any:
    """Build a component from a config node.

    ``spec`` is a short name / dotted path string, or a mapping with ``_component_`` and
    keyword arguments. ``args`` and ``kwargs`` are supplied by the recipe (the optimizer's
    parameters, the model's vocabulary size) and take precedence. ``key`` is the config
    key, used in error messages. A constructor that rejects its arguments (``TypeError``,
    ``ValueError``) becomes one :class:`ComponentError` naming ``key``.
    """
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, str):
        spec = {"_component_": spec}
    if not isinstance(spec, Mapping) or "_component_" not in spec:
        raise ComponentError(
            f"{key}: expected a component name or a mapping with `_component_`, got {spec!r}."
        )
    options = {k: v for k, v in spec.items() if k != "_component_"}
    factory = resolve(kind, spec["_component_"], key=f"{key}._component_")
    check_arguments(factory, options, key, spec["_component_"])
    options = as_numbers(factory, options, key)
    for name, value in kwargs.items():  # the recipe's value wins: a different one in the config would do nothing
        if name in options and options[name] != value:
            raise ComponentError(f"config key {key}.{name}={options[name]!r} is set by the recipe ({name}={value!r}"
                                 f"{RECIPE_SETS.get(name, '')}), so the config's value would be ignored. Fix: remove "
                                 f"{key}.{name}{RECIPE_FIX.get(name, '')}.")
    options.update(kwargs)
    try:
        return factory(*args, **options)
    except LetRecipesError as err:
        if str(err).startswith(key):
            raise
        raise ComponentError(f"{key}: cannot build {spec['_component_']!r}: {err}") from err
    except (TypeError, ValueError) as err:
        unmet = _unmet_parameters(factory, len(args), options)
        if unmet and isinstance(err, TypeError) and "missing" in str(err):
            # a loss (or schedule, projector...) registered itself rather than what builds it
            raise ComponentError(
                f"{key}: cannot build {spec['_component_']!r}: what is registered for {kind} is called with the "
                f"config's keys to build the component, and {spec['_component_']!r} needs {', '.join(unmet)}, which "
                f"no key gives. Fix: register what builds it (a class, or a function that returns it; "
                f"docs/extending.md shows each kind's interface), or set {key}.{unmet[0]} if it is a setting.") from err
        raise ComponentError(f"{key}: cannot build {spec['_component_']!r}: {str(err).splitlines()[0]}. "
                             f"Fix: check {key}._component_ and its keys (docs/configs.md).") from err


def _unmet_parameters(factory: Callable[..., Any], positional: int, given: Mapping[str, Any]) -> List[str]:
    """The required parameters of ``factory`` that neither ``positional`` arguments nor the
    ``given`` keys fill."""
    try:
        parameters = list(signature(factory).parameters.values())
    except (TypeError, ValueError):
        return []
    named = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [p.name for i, p in enumerate(named) if p.default is p.empty and p.name not in given
            and not (i < positional and p.kind is not p.KEYWORD_ONLY)]
