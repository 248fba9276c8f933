"""The glue between a command line and a recipe: config lookup, ``key=value`` overrides,
and the runner that turns user errors into one line.

``--config`` takes a path to a YAML file, or a short name looked up (``.yaml`` added)
in ``recipes/configs/`` of a source checkout, then in the configs shipped inside the
installed package (``letrecipes/configs``).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import difflib
import functools
import io
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from letrecipes._schema import validate as validate_config
from letrecipes.components.errors import LetRecipesError, StopRequested, closest_name, warnings_as_lines
from letrecipes.components.files import (LOCALE_FIX, cause_and_fix, environment_errors, escape_unprintable_output,
                                         is_utf8, misread_as_utf8, names_encoding, os_error_in)
from letrecipes.components.preemption import (StoppedBeforeTraining, stop_at_once_on_signals,
                                               stop_at_once_with_one_line, stop_with_the_launcher)


class ConfigError(LetRecipesError):
    pass


def config_dirs() -> List[Path]:
    """Where short config names are looked up, in order."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "recipes" / "configs", here / "configs"]
    return [d for d in candidates if d.is_dir()]


def available_configs() -> List[str]:
    names = set()
    for d in config_dirs():
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def torchtune_config_dir() -> Optional[Path]:
    """Where torchtune keeps its own recipes' configs: ``tune run`` swaps a name like
    ``llama3_2/1B_full`` for a file there before our recipe sees it."""
    import importlib.util

    spec = importlib.util.find_spec("torchtune")
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).resolve().parents[1] / "recipes" / "configs"


# Top-level keys of torchtune's recipe configs that ours never have: such a config was written for them.
TORCHTUNE_KEYS = {"checkpointer", "epochs"}


def not_ours(name: str, what: str) -> str:
    return (f"--config {name} is {what}, written for torchtune's fine-tuning recipes (checkpointer, epochs, ...); "
            f"letrecipes' recipes do not read it. Fix: one of letrecipes' configs ({', '.join(available_configs())}), "
            "or your own from `letrecipes cp let_tiny my_run.yaml`.")


def resolve_config_path(name: str, recipes: Sequence[str] = ()) -> Path:
    """The YAML file ``name`` means: a path, or a shipped config's name. ``recipes``: the
    recipe names the caller also takes (``letrecipes cp``), for its error."""
    path = Path(name).expanduser()
    given = "cp: the config" if recipes else "--config"
    if not name.strip():  # Path("") is the working folder, which would be named "a folder"
        fix = f"a recipe ({', '.join(recipes)}) or a config" if recipes else "--config <a YAML file>, or one"
        raise ConfigError(f"{'cp: what to copy' if recipes else '--config'} is empty. Fix: {fix} of: "
                          f"{', '.join(available_configs())}.")
    if name.startswith(("http://", "https://")):
        raise ConfigError(f"{given} {name!r} is a web address; a config is read from a file and a run never downloads. "
                          f"Fix: fetch it first (curl -LO {name}) and give {Path(name).name}.")
    if path.is_dir():
        raise ConfigError(f"--config {name!r} is a folder. Fix: name a YAML file in it, or one of: "
                          f"{', '.join(available_configs())}.")
    torchtune_dir = torchtune_config_dir()
    if path.is_file() and torchtune_dir is not None and path.resolve().is_relative_to(torchtune_dir):
        raise ConfigError(not_ours(repr(str(path.resolve().relative_to(torchtune_dir).with_suffix(''))),
                                   "one of torchtune's own configs"))
    if path.is_file():
        return path
    if path.suffix not in (".yaml", ".yml") and "/" not in name:
        for d in config_dirs():
            candidate = d / f"{name}.yaml"
            if candidate.is_file():
                return candidate
    close = difflib.get_close_matches(name, [*recipes, *available_configs()], n=1, cutoff=0.75)
    hint = f" Did you mean {close[0]}?" if close else ""
    if recipes:
        raise ConfigError(f"cp: {name!r} is neither a recipe ({', '.join(recipes)}) nor a file or shipped config.{hint} "
                          f"Fix: one of those recipes, or a config: {', '.join(available_configs())}.")
    raise ConfigError(
        f"--config {name!r}: no such file, and no shipped config of that name.{hint} "
        f"Fix: give a path to a YAML file or one of: {', '.join(available_configs())}."
    )


def yaml_problem(err: Exception, path: Path) -> Tuple[str, str]:
    """A YAML parser's several-line message as one line (the problem and where it is), and
    the fix. A tab in the indentation gets several different messages from the parser."""
    if isinstance(err, UnicodeDecodeError):  # a file saved as Latin-1 or cp1252 (an editor's default on Windows)
        data = path.read_bytes()
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # PowerShell 5's `>` writes it
            return ("it is UTF-16 (its first bytes are UTF-16's byte-order mark), not UTF-8",
                    "save the file as UTF-8 (PowerShell: Set-Content or Out-File -Encoding utf8; an editor's "
                    "'Save with encoding')")
        line = data[:err.start].count(b"\n") + 1
        return (f"it is not UTF-8 (byte 0x{err.object[err.start]:02x} on line {line})",
                "save the file as UTF-8")
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if not (problem and mark is not None):
        return " ".join(str(err).split()), "correct the YAML"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    tab = "\t" in line[:len(line) - len(line.lstrip())]
    return (f"{problem} (line {mark.line + 1}, column {mark.column + 1})",
            "indent with spaces (YAML allows no tabs)" if tab else "correct the YAML there")


def not_a_mapping(path: Path, kind: str) -> ConfigError:
    return ConfigError(f"--config {str(path)!r} holds a {kind} at the top level, where a config is a mapping of keys "
                       "(`max_steps: 300`, `data:` and its keys below). Fix: start from a shipped one: `letrecipes "
                       "cat let_tiny` shows one, `letrecipes cp let_tiny my_run.yaml` copies it.")


def load_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``name`` with ``key=value`` overrides applied (torchtune semantics)."""
    # imported here: torchtune pulls in torch, which `letrecipes ls` and the prepare step's
    # worker processes (they re-import the command's main module) do not need
    from torchtune.config._utils import _merge_yaml_and_cli_args

    path = resolve_config_path(name)
    try:
        yaml = OmegaConf.load(path)
    except Exception as err:  # omegaconf/yaml raise assorted types
        scalar = re.match(r"Invalid loaded object type: (\w+)", str(err))  # omegaconf's word for `5` or `text`
        if scalar:
            raise not_a_mapping(path, {"str": "text", "int": "number", "float": "number"}.get(
                scalar.group(1), scalar.group(1))) from err
        problem, fix = yaml_problem(err, Path(path))
        raise ConfigError(f"--config {str(path)!r} is not valid YAML: {problem}. Fix: {fix}.") from err
    if not isinstance(yaml, DictConfig):
        raise not_a_mapping(path, type(yaml).__name__.removesuffix("Config").lower())
    if not yaml:
        raise ConfigError(f"--config {str(path)!r} is empty. Fix: start from a shipped one: `letrecipes cp let_tiny "
                          f"{path}`.")
    if "defaults" in yaml:
        raise ConfigError(f"--config {str(path)!r} has `defaults:`, Hydra's composition of configs, which torchtune-style "
                          "configs do not have. Fix: copy the config it builds on (`letrecipes cp let_tiny my_run.yaml`) "
                          "and edit the copy, or give changes as key=value overrides.")
    if TORCHTUNE_KEYS <= set(yaml.keys()):
        raise ConfigError(not_ours(repr(str(path)), "a torchtune config"))
    for override in overrides:
        if override.partition("=")[0].strip() == "" and "=" in override:
            raise ConfigError(f"the override {override!r} has no key. Fix: write key=value, like max_steps=100.")
        key, _, value = override.partition("=")
        meant = misread_as_utf8(value)
        if meant is not None:  # UTF-8 bytes from the terminal, decoded in the locale's other encoding
            raise ConfigError(f"{key}: its value is UTF-8 text ({meant!r}), but this process reads its command line as "
                              f"{names_encoding()}, which makes it {value!r}. Fix: {LOCALE_FIX}.")
        if not is_utf8(override):  # bytes the shell passed that are not UTF-8
            raise ConfigError(f"{key}: its value {os.fsencode(value)!r} is not UTF-8 (a file or folder name in another "
                              "encoding, Latin-1 say), which the run's config, records and log cannot hold. Fix: a "
                              "UTF-8 name (an existing file or folder renamed: convmv -f latin1 -t utf8 --notest "
                              "<it>).")
    for override in overrides:
        if override.startswith("~"):
            _check_removal(yaml, override, path)
    _check_keys_into_values(yaml, overrides)
    merged, held = _values_holding_equals(_name_short_components(yaml, overrides))
    try:
        cfg = _merge_yaml_and_cli_args(argparse.Namespace(**OmegaConf.to_container(yaml)), merged)
        for key, (placeholder, value) in held.items():
            # torchtune moves a component's value to its _component_; a later override may have replaced it
            node = OmegaConf.select(cfg, key, default=None)
            where = f"{key}._component_" if isinstance(node, DictConfig) else key
            if OmegaConf.select(cfg, where, default=None) == placeholder:
                OmegaConf.update(cfg, where, OmegaConf.from_dotlist([f"value={value}"])["value"], merge=False)
    except ValueError as err:
        raise ConfigError(f"{str(err).rstrip('.')}. Fix: write each override as key=value (no spaces around the =), "
                          "like max_steps=100, and quote one whose value holds spaces: 'model.attn={a: 1, b: 2}'.") from err
    except Exception as err:  # the YAML parser's own types, omegaconf's for a key it cannot set
        raise ConfigError(_override_problem(overrides, err, yaml)) from err
    return cfg


# the keys a config may give as a component's short name (`projector: mlp`, `metric_logger: wandb`);
# not alignment.layer_map, whose short forms (`L2E`, pairs) are presets, not component names
COMPONENT_KEYS = ("model", "optimizer", "lr_scheduler", "metric_logger", "teacher", "alignment.projector",
                  "alignment.loss", "alignment.schedule", "alignment.pooling")


def _name_short_components(yaml: DictConfig, overrides: Sequence[str]) -> List[str]:
    """``overrides`` with ``<key>._component_=<name>`` put before the first option given to a
    component that the file (``projector: mlp``) or an earlier override (``alignment.projector=mlp``)
    names by its short name alone: torchtune's merge replaced the name with the options
    (``{hidden_dim: 64}``), a mapping that names no component."""
    named = {key: value for key in COMPONENT_KEYS
             if isinstance(value := OmegaConf.select(yaml, key, default=None), str)}
    out = []
    for override in overrides:
        key, equals, value = override.lstrip("~").partition("=")
        key = key.strip()
        home = next((k for k in COMPONENT_KEYS if key.startswith(k + ".")), None)
        if override.startswith("~"):
            named.pop(key, None)
        elif key in COMPONENT_KEYS:  # the name given anew: a mapping, or a dict in the file, takes no short form
            file_value = OmegaConf.select(yaml, key, default=None)
            text = value.strip()
            if equals and text and not text.startswith(("{", "[")) and not isinstance(file_value, DictConfig) \
                    and text.lower() not in ("null", "none"):
                named[key] = text
            else:
                named.pop(key, None)
        elif home in named and key != f"{home}._component_":
            out.append(f"{home}._component_={named.pop(home)}")
        elif home in named:
            named.pop(home)
        out.append(override)
    return out


def _check_keys_into_values(yaml: DictConfig, overrides: Sequence[str]) -> None:
    """An override whose key goes on past a value the file sets (``alignment.layer_map.0=3``
    where the file says ``layer_map: L2E``): omegaconf's merge made the value a section
    (``{'0': 3}``), refused later as a mapping that names no component. A component's short
    name (``projector: linear``) takes options this way, and is left to its own handling."""
    given = set()  # keys an earlier override set anew: a section may stand there now
    for override in overrides:
        key = override.lstrip("~").partition("=")[0].strip()
        parts = key.split(".")
        for end in range(1, len(parts)):
            above = ".".join(parts[:end])
            value = OmegaConf.select(yaml, above, default=None, throw_on_resolution_failure=False)
            if above in given or above in COMPONENT_KEYS or isinstance(value, (DictConfig, ListConfig)) or value is None:
                continue
            shape = (" (a preset such as L2E, or pairs: 'alignment.layer_map=[[2, 3]]', student block 2 <- teacher "
                     "layer 3)" if above == "alignment.layer_map" else "")
            raise ConfigError(f"the override {override!r} reaches into {above}, which the config sets to {value!r}: "
                              f"a value, not a section. Fix: set {above} whole{shape}.")
        given.add(key)


def _check_removal(yaml: DictConfig, override: str, path) -> None:
    """``~key`` removes a key the config file sets (torchtune's override). torchtune's own
    refusals, of a key the file does not have and of a component, came with the fix for
    a malformed override (spaces around the =), which these are not."""
    key = override[1:].partition("=")[0].strip()
    missing = object()
    node = OmegaConf.select(yaml, key, default=missing) if key else missing
    if isinstance(node, DictConfig) and "_component_" in node or key.split(".")[-1] == "_component_":
        section = key.removesuffix("._component_")
        raise ConfigError(f"the override {override!r} removes the component {section}, which torchtune's overrides "
                          f"cannot do. Fix: name another component ({section}._component_=<name>), or edit a copy of "
                          f"the config (letrecipes cp {Path(str(path)).stem} my_run.yaml).")
    if not key:
        raise ConfigError(f"the override {override!r} names no key to remove. Fix: ~ followed by a key the config "
                          "sets, like ~lr_scheduler.min_lr_ratio.")
    if node is missing:
        parent, _, leaf = key.rpartition(".")
        holder = OmegaConf.select(yaml, parent, default=None) if parent else yaml
        keys = [str(k) for k in holder.keys()] if isinstance(holder, DictConfig) else []
        close = closest_name(leaf, keys)
        holds = f" ({parent} holds {', '.join(keys)})" if parent and keys else ""
        fix = (f"~{parent + '.' if parent else ''}{close}, if that is the key meant" if close else
               "leave the override out: there is nothing to remove")
        raise ConfigError(f"the override {override!r} removes the key {key}, which --config {str(path)!r} does not "
                          f"set{holds}. Fix: {fix}.")


def _values_holding_equals(overrides: Sequence[str]) -> Tuple[List[str], Dict[str, Tuple[str, str]]]:
    """The overrides with each value that holds an ``=`` (``output_dir=runs/lr=3e-4``, a
    Hive-partitioned ``data.source=data/lang=en``) replaced by a placeholder, and those
    values by key. torchtune's merge splits an override at every ``=`` and refuses these;
    the key ends at the first ``=`` (keys hold none), as omegaconf's dotlist reads it, and the
    value goes back in, read as omegaconf reads a value, once torchtune's merge has run."""
    kept, held = [], {}
    for index, override in enumerate(overrides):
        key, _, value = override.partition("=")
        if "=" in value and not override.startswith("~"):
            placeholder = f"letrecipes_value_of_override_{index}"
            held[key.strip()] = (placeholder, value)
            override = f"{key}={placeholder}"
        kept.append(override)
    return kept, held


def _override_problem(overrides: Sequence[str], err: Exception, file: Optional[DictConfig] = None) -> str:
    """Which override the merge failed on, and why, in one line: each value is read as YAML
    (omegaconf's dotlist), so ``{a:1}`` (no space after the colon) is no mapping; and a key
    into a list (``optimizer.betas.0=0.8``), which an override cannot address."""
    for override in overrides if file is not None else ():
        parts = override.lstrip("~").partition("=")[0].strip().split(".")
        for end in range(1, len(parts)):
            node = OmegaConf.select(file, ".".join(parts[:end]), default=None)
            if isinstance(node, ListConfig):
                whole, index, value = ".".join(parts[:end]), parts[end], override.partition("=")[2]
                items = OmegaConf.to_container(node, resolve=True)
                if index.isdigit() and int(index) < len(items) and end + 1 == len(parts):
                    with contextlib.suppress(yaml.YAMLError):  # a value that is no YAML is shown as given
                        value = yaml.safe_load(value) if value else value
                    items[int(index)] = value
                shown = ", ".join(json.dumps(item) if not isinstance(item, str) else item for item in items)
                return (f"the override {override!r} reaches into {whole}, a list, which an override sets whole. Fix: "
                        f"'{whole}=[{shown}]'.")
    try:  # the loader omegaconf reads override values with (it moved between releases)
        from omegaconf._yaml import get_yaml_loader
    except ImportError:
        from omegaconf._utils import get_yaml_loader
    for override in overrides:
        key, _, value = override.partition("=")
        try:
            yaml.load(value, Loader=get_yaml_loader())
        except yaml.YAMLError as bad:
            mark = getattr(bad, "problem_mark", None)
            where = f" at character {mark.column + 1} of the value" if mark is not None else ""
            if "{" in value:
                fix = (f"a space after each ':' of a mapping, and the override in shell quotes: "
                       f"'{key}={{_component_: pairs, pairs: [[2, -1]]}}'")
            elif "[" in value:
                fix = f"close each bracket, and the override in shell quotes: '{key}=[[2, -1]]'"
            else:
                fix = f"quote the value as a string: '{key}=\"{value}\"'"
            return (f"the override {override!r} is not valid YAML after the '=': {getattr(bad, 'problem', None) or bad}"
                    f"{where}. Fix: {fix}.")
    return (f"the overrides {list(overrides)} cannot be applied: {' '.join(str(err).split())[:300]}. Fix: check each "
            "key=value against `letrecipes cat <config>`.")


def parse(recipe_main: Callable[[DictConfig], None]) -> Callable[[Optional[Sequence[str]]], None]:
    """Decorator for a recipe's entry point: ``--config NAME_OR_PATH [key=value ...]``."""

    @functools.wraps(recipe_main)
    def wrapper(argv: Optional[Sequence[str]] = None) -> None:
        file = Path(recipe_main.__code__.co_filename)  # its module is __main__ under python -m
        recipe = f"letrecipes/{file.stem}" if file.parent == Path(__file__).parent else file.stem  # or a user's copy
        parser = argparse.ArgumentParser(
            description=recipe_main.__doc__, usage="%(prog)s [-h] --config CONFIG [key=value ...]",
            epilog=f"shipped configs: {', '.join(available_configs())}. Overrides are key=value pairs, as in torchtune "
                   f"(max_steps=100 data.seq_len=512); `letrecipes cat <config> [key=value ...]` prints the resolved "
                   f"config, `letrecipes validate` checks it; `tune run {recipe} --config ...` runs the same.")
        parser.add_argument("--config", required=True, help="a shipped config's name or a YAML file's path")
        args, overrides = parser.parse_known_args(argv)
        try:
            cfg = load_config(args.config, overrides)
        except ConfigError as err:
            exit_with_line(f"error: {err}", echo=not is_other_process_of_a_node())
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            # under torchrun: a bug (not one of our errors, which write their line there themselves) goes to
            # the launcher's error file with its traceback, and its summary names it instead of "To enable
            # traceback see: https://..."
            from torch.distributed.elastic.multiprocessing.errors import record

            record(recipe_main)(cfg)
        else:
            recipe_main(cfg)

    return wrapper


def is_other_process_of_a_node() -> bool:
    """Under torchrun, a process that is not its node's first. Its errors go to torchrun's
    summary (each failed rank's line, printed when the job ends) and not to the log as
    well: most are every rank's alike (a config, a missing file), and 8 GPUs printed the
    same line 8 times. Without torchrun there is no summary, and every process prints."""
    return bool(os.environ.get("TORCHELASTIC_ERROR_FILE")) and int(os.environ.get("LOCAL_RANK", "0") or 0) != 0


@contextlib.contextmanager
def errors_as_one_line():
    """Turn the errors a user can fix (every :class:`LetRecipesError`: bad config, data,
    teacher, checkpoint, divergence) into one ``error: ...`` line and exit status 1.
    ``LETRECIPES_TRACEBACK=1`` keeps the traceback; any other exception is a bug and keeps it.
    Warnings of the project come out as one ``warning: ...`` line each, the same way.
    An error that rank 0 found and shared (:func:`parallel.on_rank0`) is printed by rank 0
    alone, and so is, under torchrun, any error of a node's other processes
    (:func:`is_other_process_of_a_node`)."""
    escape_unprintable_output()
    warnings_as_lines()
    try:
        yield
    except (LetRecipesError, StopRequested) as err:
        if os.environ.get("LETRECIPES_TRACEBACK"):
            raise
        quiet = getattr(err, "shared_by_rank0", False) or is_other_process_of_a_node()
        exit_with_line(f"error: {err}", echo=not quiet)


def exit_with_line(line: str, echo: bool = True) -> NoReturn:
    """``sys.exit(line)``, the line and its newline in one write: ranks that fail together
    (an error rank 0 shares with every rank) each print a whole line, even when stderr is
    unbuffered (PYTHONUNBUFFERED, as torchrun's children often run), where Python writes the
    message and its newline apart and two ranks' lines ran into one. Under torchrun the line
    also goes to the launcher's error file, so the failure summary it prints last names it
    as the root cause (before: ``traceback : To enable traceback see: https://...``)."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):
            # torchrun's own layout (the message in extraInfo.py_callstack is what its summary shows): a
            # plain string message made the launcher warn of "a new message format" in two more lines
            Path(error_file).write_text(json.dumps({"message": {
                "message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}))
    if not echo:  # another rank prints it: exit status 1, the line in the launcher's summary only
        sys.exit(1)
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
        sys.stderr.reconfigure(write_through=False, line_buffering=True)
    sys.exit(line)


def path_keys(cfg: DictConfig) -> dict:
    """The config's keys that name paths, each with its path: what an OS error is traced to."""
    data, tokenizer, teacher = (cfg.get(section) or {} for section in ("data", "tokenizer", "teacher"))
    keys = {"output_dir": cfg.get("output_dir"), "data.cache_dir": data.get("cache_dir"), "data.source": data.get("source"),
            "data.val_source": data.get("val_source"), "tokenizer.path": tokenizer.get("path"),
            "teacher.path": teacher.get("path"), "init_from": cfg.get("init_from")}
    return {key: Path(str(value)).expanduser() for key, value in keys.items()
            if isinstance(value, (str, Path)) and value}


def run(recipe_class, cfg: DictConfig) -> None:
    """Check the config, then setup / train / cleanup; ``dry_run=true`` only checks the
    config and prints the cost estimate. ``cleanup`` runs even when setup fails (it
    releases the run folder's lock)."""
    with errors_as_one_line():
        validate_config(cfg, with_teacher=recipe_class.uses_teacher)  # before anything is built or written
        recipe = recipe_class(cfg)
        if cfg.get("dry_run", False):
            from letrecipes._dry_run import dry_run

            dry_run(cfg, with_teacher=recipe_class.uses_teacher)
            return
    stop_with_the_launcher()
    from letrecipes.components.checkpointing import quiet_dcp_writer_finalizer  # torch: imported by the recipe already

    quiet_dcp_writer_finalizer()
    during, kept = ("during setup, before the first step", "Nothing was trained; corpus shards prepared so far are "
                    "kept, and launching again goes on from them.")
    try:
        with errors_as_one_line():
            with stop_at_once_with_one_line(during, kept):
                # an OS error the setup's own checks did not name (a failing disk under a checkpoint, the
                # tokenizer or the teacher as they are read): one line naming the key whose path it was
                with environment_errors(path_keys(cfg), "setting up the run"):
                    recipe.setup()
            recipe.train()
    finally:
        close(recipe.cleanup, "the run")


def close(cleanup: Callable[[], None], what: str) -> None:
    """Run a recipe's ``cleanup`` (release the run's lock, close its files, end the process
    group, remove temporary copies) where a signal stops it at once: a Ctrl-C there met the
    default handler, a KeyboardInterrupt traceback from wherever the closing was. The line
    says so unless the run is already failing, whose own error line then stands."""
    failing = sys.exc_info()[1]
    try:
        with stop_at_once_on_signals(f"while {what} was closing", "What it wrote is complete, as the lines above say; "
                                     "only its closing (releasing its lock, removing temporary files) was cut short."):
            cleanup()
    except StoppedBeforeTraining as stopped:
        if failing is None:
            exit_with_line(f"error: {stopped}")
    except Exception as err:  # noqa: BLE001 - a closing that fails is said in one line, or not at all
        if failing is not None:
            return  # the run's own error line stands (a full disk fails its write, then the file's close again)
        os_err = os_error_in(err)
        if os_err is None:
            raise
        cause, fix = cause_and_fix(os_err)
        exit_with_line(f"error: {what} ended, but closing it failed: {cause}. What it wrote before is complete "
                       f"(checkpoints and export, as the lines above say); its log may lack its last lines. Fix: {fix}.")
