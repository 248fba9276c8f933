"""`tune run` as a user types it: short config names, from the repo root, from another
directory after a non-editable install, and on a copied-and-edited recipe."""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from letrecipes.components.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tune(args, cwd, python=sys.executable, timeout=300):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([str(python), "-m", "torchtune._cli.tune", "run", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_tune_run_short_names_from_the_repo_root(base_overrides, tmp_path):
    teacher = tmp_path / "teacher"
    # argparse's --config=NAME: tune looks for the word --config alone ("The '--config' argument is required")
    tune(["letrecipes/pretrain", "--config=pretrain_tiny", *base_overrides, f"output_dir={teacher}",
          "max_steps=2"], cwd=REPO)
    out = tmp_path / "let"
    result = tune(["letrecipes/let_pretrain.py", "--config", "let_tiny", *base_overrides, f"output_dir={out}",
                   f"teacher.path={teacher / 'final'}", "max_steps=2"], cwd=REPO)
    assert "teacher:" in result.stdout
    records = read_metrics(out / "metrics.jsonl")
    assert {"align_loss", "lambda", "cosine"} <= records[0].keys()


def test_tune_ls_cp_and_cat_list_and_copy_our_recipes_and_configs(tmp_path):
    """torchtune's own way to copy a recipe to edit it (`tune cp <recipe> <file>`) answered
    "Invalid file name" for ours, and `tune ls` did not show them: they are now in tune's list
    for those commands, each config under its recipe (a teacher: LET; tasks: eval)."""
    def tune_command(*args):
        env = {**os.environ}
        env.pop("PYTHONPATH", None)
        return subprocess.run([sys.executable, "-m", "torchtune._cli.tune", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    rows = [line.split() for line in tune_command("ls").stdout.splitlines()]
    start = rows.index(["letrecipes/let_pretrain", "let_1b4"])
    assert ["let_7b"] in rows[start:start + 6] and ["let_tiny"] in rows[start:start + 6], rows[start:]
    assert ["letrecipes/pretrain", "baseline_tiny"] in rows and ["letrecipes/eval", "eval"] in rows
    assert ["full_finetune_distributed", "llama2/7B_full"] in rows  # torchtune's own are still there
    for name, destination, source in (("letrecipes/let_pretrain", "my_let.py", REPO / "letrecipes/let_pretrain.py"),
                                      ("let_7b", "my_7b", REPO / "recipes/configs/let_7b.yaml")):
        done = tune_command("cp", name, destination)
        assert done.returncode == 0, done.stderr
        copied = tmp_path / (destination if destination.endswith(".py") else destination + ".yaml")
        assert copied.read_bytes() == source.read_bytes()
    assert tune_command("cat", "let_7b").stdout.startswith("output_dir: outputs/let_7b\n")
    # only those commands: an import of torchtune's list elsewhere is torchtune's alone
    listed = subprocess.run([sys.executable, "-c", "import letrecipes, torchtune._recipe_registry as r; "
                             "print(sorted(x.name for x in r.get_all_recipes() if 'letrecipes' in x.name))"],
                            capture_output=True, text=True, timeout=120)
    assert listed.stdout.strip() == "[]", listed.stdout + listed.stderr


def test_letrecipes_cat_prints_the_resolved_config():
    result = subprocess.run([sys.executable, "-m", "letrecipes", "cat", "let_tiny", "alignment.schedule.rho0=0.3",
                             "max_steps=7"], capture_output=True, text=True, cwd=REPO, check=True)
    assert "rho0: 0.3" in result.stdout and "max_steps: 7" in result.stdout
    listing = subprocess.run([sys.executable, "-m", "letrecipes", "ls"], capture_output=True, text=True, check=True)
    assert "let_tiny" in listing.stdout and "let_pretrain" in listing.stdout


def test_letrecipes_refuses_stray_arguments_and_stops_quietly_when_its_reader_does(tmp_path, monkeypatch, capsys):
    from letrecipes import cli

    for argv in (["ls", "extra"], ["export", "a", "b", "--bogus"]):
        with pytest.raises(SystemExit) as err:
            cli.main(argv)
        assert err.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err

    class ClosedPipe:  # `letrecipes ls | head -1`: the reader has gone
        def __init__(self):
            self.fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)

        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return self.fd

    pipe = ClosedPipe()
    monkeypatch.setattr(sys, "stdout", pipe)
    assert cli.main(["ls"]) == 1  # no traceback
    os.close(pipe.fd)


def test_copy_edit_and_run_a_recipe(base_overrides, teacher_dir, tmp_path):
    # the README's `tune cp letrecipes/let_pretrain my_let.py ... # or letrecipes cp`: letrecipes cp took only let_pretrain
    for name, dest in (("letrecipes/let_pretrain", "my_let.py"), ("let_tiny", "my_let.yaml")):
        subprocess.run([sys.executable, "-m", "letrecipes", "cp", name, str(tmp_path / dest)], check=True, cwd=REPO)
    recipe = tmp_path / "my_let.py"
    source = recipe.read_text(encoding="utf-8")
    assert "class LETPretrainRecipe" in source
    helped = subprocess.run([sys.executable, str(recipe), "--help"], capture_output=True, text=True, check=True)
    assert "[key=value ...]" in helped.stdout and "let_tiny" in helped.stdout and "`tune run my_let --config" in \
        " ".join(helped.stdout.split())
    # the one change: a different loss weight expression, visible in the logs
    recipe.write_text(source.replace("loss = nll + weight * align", "loss = nll + 2 * weight * align\n"
                                     "        print('MY_LET_LOSS', flush=True) if self.step == 0 else None"))
    result = tune(["my_let", "--config", "my_let.yaml", *base_overrides, f"output_dir={tmp_path / 'out'}",
                   f"teacher.path={teacher_dir}", "max_steps=2"], cwd=tmp_path)
    assert "MY_LET_LOSS" in result.stdout
    first = read_metrics(tmp_path / "out" / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(first["nll"] + 2 * first["lambda"] * first["align_loss"], rel=1e-4)
    refused = subprocess.run([sys.executable, "-m", "letrecipes", "cp", "let_tiny", str(tmp_path / "my_let.yaml")],
                             capture_output=True, text=True, cwd=REPO)
    assert refused.returncode != 0 and "not overwriting" in refused.stderr


@pytest.mark.slow
def test_non_editable_install_runs_from_another_directory(base_overrides, teacher_dir, tmp_path):
    """`pip install .` (not editable) into a fresh venv; configs ship in the wheel."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The heavy dependencies come from this environment (a path entry, not its .pth
    # hooks, so this project's own editable install stays invisible to the new venv).
    deps = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps_from_test_env.pth").write_text(deps + "\n")
    build = tmp_path / "src"
    _copy_tree(REPO, build)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(build)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import letrecipes, letrecipes.components as c, importlib.util; "
                            "print(letrecipes.__file__); print(c.__file__); "
                            "assert importlib.util.find_spec('components') is None, 'top-level components installed'"], cwd=elsewhere, capture_output=True, text=True, check=True)
    assert all(line.startswith(site) for line in where.stdout.split()), where.stdout
    teacher = elsewhere / "teacher"
    tune(["letrecipes/pretrain", "--config", "pretrain_tiny", *base_overrides, f"output_dir={teacher}", "max_steps=2"],
         cwd=elsewhere, python=python)
    tune(["letrecipes/let_pretrain", "--config", "let_tiny", *base_overrides, f"output_dir={elsewhere / 'let'}",
          f"teacher.path={teacher / 'final'}", "max_steps=2"], cwd=elsewhere, python=python)
    assert (elsewhere / "let" / "final" / "model.safetensors").is_file()


def _copy_tree(src: Path, dst: Path) -> None:
    """The tracked sources only (no .venv, outputs or caches)."""
    import shutil

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=src,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, target)


def test_a_compiler_cache_folder_that_cannot_be_made_is_one_line(tmp_path):
    """torch makes its compiler cache folder as torchtune imports it (through torchao and
    torch._dynamo): a TORCHINDUCTOR_CACHE_DIR that cannot be made ended every recipe in a
    35-line traceback before any line of ours ran."""
    (tmp_path / "a_file").write_text("")
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "a_file" / "cache")}
    result = subprocess.run([sys.executable, "-m", "letrecipes.pretrain", "--config", "pretrain_tiny"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == (
        "error: torch cannot make its compiler cache folder (TORCHINDUCTOR_CACHE_DIR): a part of the path is a file, "
        f"not a folder ({tmp_path / 'a_file' / 'cache'}). torch makes it as it is imported, so nothing ran. Fix: point "
        "it at a folder (or move the file away), or TORCHINDUCTOR_CACHE_DIR=<a folder you can write> (or unset it: "
        "torch then uses torchinductor_<user> in the temporary folder)."), result.stderr[-3000:]
    # another program's failure keeps its traceback
    other = subprocess.run([sys.executable, "-c", "import torch._dynamo"], env=env, capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    assert other.returncode == 1 and "Traceback" in other.stderr and "error: torch cannot" not in other.stderr


def test_tune_for_a_user_without_a_home_folder_is_one_line():
    """A container started with --user 4242 (no /etc/passwd entry) and no HOME: every `tune`
    command died importing kagglehub (for `tune download`) in "RuntimeError: Could not
    determine home directory" (seen for real as uid 4242 here; the passwd lookup is faked
    below, as a test runs as a user who has an entry)."""
    no_entry = ("import pwd; pwd.getpwuid = lambda uid: (_ for _ in ()).throw(KeyError(uid)); "
                "import torchtune._cli.tune  # as `tune` starts, in a letrecipes venv")
    env = {k: v for k, v in os.environ.items() if k != "HOME"}
    result = subprocess.run([sys.executable, "-c", no_entry], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == (
        f"error: this user (uid {os.getuid()}) has no home folder: HOME is not set and the user has no entry in "
        "/etc/passwd (a container started with --user), and torchtune's command line looks it up as it starts "
        "(kagglehub, which `tune download` uses). Fix: export HOME=<a folder you can write> (docker run -e "
        "HOME=/tmp ...), or start the recipe without tune: python -m letrecipes.let_pretrain --config ..."), \
        result.stderr[-3000:]
    from letrecipes import _start_failures

    said = []
    hook = _start_failures._start_failures_are_one_line(lambda *args: said.append(args))
    error = RuntimeError("Could not determine home directory.")
    hook(RuntimeError, error, None)  # this process: HOME is set, the error is someone else's
    assert said and said[-1][1] is error


def test_a_misspelt_recipe_is_one_line_naming_the_recipes(tmp_path):
    """`tune run letrecipes/<typo>` used to end in runpy's 15-line ImportError traceback."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    for command in (["-m", "torchtune._cli.tune", "run", "letrecipes/let_pretrian", "--config", "let_tiny"],
                    ["-m", "letrecipes.let_pretrian", "--config", "let_tiny"]):
        result = subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip() == (
            "error: no recipe letrecipes/let_pretrian. Did you mean letrecipes/let_pretrain? Fix: one of "
            "letrecipes/pretrain, letrecipes/let_pretrain, letrecipes/eval (or a recipe you copied with letrecipes "
            "cp: tune run my_let --config ...)."), result.stderr[-2000:]
    # the module path with dots: tune drops ".let_pretrain" as a suffix and ran our CLI, which said
    # "argument command: invalid choice: 'let_tiny'"
    result = subprocess.run([sys.executable, "-m", "torchtune._cli.tune", "run", "letrecipes.let_pretrain", "--config",
                             "let_tiny"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: `tune run letrecipes.let_pretrain` ran the package letrecipes, not the recipe: tune run takes a recipe "
        "as a path and reads what follows its last dot as a file suffix. Fix: tune run letrecipes/let_pretrain "
        "--config ... (a slash), or python -m letrecipes.let_pretrain --config ..."], result.stderr[-2000:]
    # a recipe without its package, and a copied recipe that is not in the working directory: runpy's
    # traceback ending in "ImportError: No module named let_pretrain" before
    for name, line in (("let_pretrain", "error: no recipe let_pretrain: letrecipes' recipes are named with their "
                        "package. Fix: tune run letrecipes/let_pretrain --config ... (or python -m "
                        "letrecipes.let_pretrain --config ...)."),
                       ("my_lett", f"error: no recipe my_lett: tune run found no torchtune recipe of that name and no "
                        f"module my_lett (a my_lett.py in the working directory, {tmp_path}, or an installed one). "
                        "Fix: run from the folder of the recipe you copied, or one of letrecipes/pretrain, "
                        "letrecipes/let_pretrain, letrecipes/eval.")):
        result = subprocess.run([sys.executable, "-m", "torchtune._cli.tune", "run", name, "--config", "let_tiny"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and result.stderr.strip() == line, result.stderr[-2000:]
    # a recipe given as a file path with ./ or a leading /: tune makes '..letrecipes.let_pretrain' of it
    # and runpy's traceback ended in "ImportError: Relative module names not supported"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "my_let.py").write_text("print('mine')")
    for path, cwd, line in (
            *((recipe, REPO, f"error: tune run {recipe}: tune takes a recipe as a module path from the working "
               "directory, without './' or a leading '/' (it made '..letrecipes.let_pretrain' of it). Fix: tune run "
               "letrecipes/let_pretrain --config ... (from any folder)")
              for recipe in ("./letrecipes/let_pretrain.py", "./letrecipes/let_pretrain")),
            (str(tmp_path / "mine" / "my_let.py"), tmp_path, f"error: tune run {tmp_path}/mine/my_let.py: tune takes a "
             "recipe as a module path from the working directory, without './' or a leading '/' (it made "
             f"'{str(tmp_path / 'mine' / 'my_let').replace('/', '.')}' of it). Fix: run it from its folder: cd "
             f"{tmp_path}/mine && tune run my_let --config ...")):
        result = subprocess.run([sys.executable, "-m", "torchtune._cli.tune", "run", path, "--config", "let_tiny"],
                                cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and result.stderr.strip() == line, result.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "torchtune._cli.tune", "run", "my_let", "--config", "x"],
                            cwd=tmp_path / "mine", env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "mine"  # the fix it names works
    result = subprocess.run([sys.executable, "-c", "raise ImportError('Relative module names not supported')"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" in result.stderr and "error: tune run" not in result.stderr  # elsewhere: Python's own
    (tmp_path / "eval.py").write_text("print('the user module')")  # a module of one's own is found first
    for command in (["-m", "torchtune._cli.tune", "run", "eval", "--config", "x"], ["-m", "eval"]):
        result = subprocess.run([sys.executable, *command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.stdout.strip() == "the user module", result.stderr[-2000:]
    (tmp_path / "eval.py").unlink()
    result = subprocess.run([sys.executable, "-m", "some_module_of_another_project"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().endswith("No module named some_module_of_another_project")  # Python's own, untouched
    # an import of a missing module still fails as Python's own, and the recipes named are the real ones
    probe = ("import importlib, letrecipes, letrecipes._unknown_recipe as u\n"
             "try:\n    import letrecipes.let_pretrian\nexcept ModuleNotFoundError as e:\n    print(e.name)\n"
             "print(all(hasattr(importlib.import_module('letrecipes.' + r), 'recipe_main') for r in u.RECIPES))\n"
             "import importlib.util\nprint(importlib.util.find_spec('letrecipes.let_pretrian'))\n"
             "print(importlib.util.find_spec('let_pretrain'))\n"
             "try:\n    import let_pretrain\nexcept ModuleNotFoundError as e:\n    print(e.name)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.split() == ["letrecipes.let_pretrian", "True", "None", "None", "let_pretrain"], \
        result.stdout + result.stderr[-2000:]


def test_a_failed_launch_is_summarised_by_what_each_rank_said_and_other_jobs_keep_torchruns_report(
        tmp_path, monkeypatch, capsys):
    """The launcher's hook for ChildFailedError (tune run / torchrun, the ranks' side is run in
    tests/test_distributed.py): ranks that said the same are one line; a signal is named (a
    SIGKILL with its likely cause); a rank that recorded nothing says so; a job that is not
    letrecipes', or LETRECIPES_TRACEBACK=1, gets torchrun's own report through the hook there was."""
    import json
    import signal
    import sys
    from datetime import datetime

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from letrecipes import _launcher

    files = iter(range(100))

    def failure(rank, exitcode, message=None):
        error_file = tmp_path / f"error-{next(files)}.json"  # a file of its own, as each rank's is
        if message is not None:
            error_file.write_text(json.dumps({"message": {"message": message, "extraInfo": {
                "py_callstack": message, "timestamp": str(1_700_000_000 + rank)}}}))
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file=str(error_file))

    config_error = "error: lr: 'abc' is not a number. Fix: lr=3e-4."
    failures = {0: failure(0, 1, config_error), 1: failure(1, 1, config_error), 2: failure(2, 1, config_error),
                3: failure(3, -signal.SIGKILL), 5: failure(5, 1), 6: failure(6, 1, "Traceback (most recent call "
                                                                                   "last):\nValueError: boom")}
    failures[3].timestamp = failures[5].timestamp = 1_700_000_003  # recorded as the launcher gathered them
    error = ChildFailedError("letrecipes.pretrain", failures)
    text = _launcher.summary(error).splitlines()
    assert text[0].startswith("letrecipes.pretrain failed on 6 processes of this node (ranks 0-3, 5-6, on ")
    assert text[0].endswith(f"; rank 0 first, at {datetime.fromtimestamp(1_700_000_000):%H:%M:%S}:")
    assert text[1] == f"  ranks 0-2: {config_error}"
    assert text[2].startswith("  rank 3: killed by signal 9 (SIGKILL) (the kernel's out-of-memory killer")
    assert text[3] == "  rank 5: exit code 1, with no error recorded: its own output above says why"
    assert text[4:] == ["  rank 6: ", "    Traceback (most recent call last):", "    ValueError: boom"]
    stopped = ChildFailedError("letrecipes.pretrain", {0: failure(0, -signal.SIGTERM), 1: failure(1, 1, config_error)})
    stopped.failures[1].timestamp = stopped.failures[0].timestamp  # the same second, as torchrun's records often are
    said = _launcher.summary(stopped).splitlines()
    assert said[0].endswith(f"rank 1 first, at {datetime.fromtimestamp(stopped.failures[1].timestamp):%H:%M:%S}:")
    assert said[1:] == [  # the rank that failed first, then the one torchrun stopped
        f"  rank 1: {config_error}", "  rank 0: stopped by the launcher (SIGTERM) once another rank had failed"]
    assert _launcher.summary(ChildFailedError("letrecipes.pretrain", {0: failure(0, -signal.SIGTERM)})).splitlines()[
        1] == "  rank 0: killed by signal 15 (SIGTERM)"  # a SIGTERM from elsewhere
    # a rank that hung: torchrun kills it 30 s after its SIGTERM (it was said to be the out-of-memory killer's)
    hung = ChildFailedError("letrecipes.pretrain", {0: failure(0, 1, "error: rank 0 waited 20 s ..."),
                                                    1: failure(1, -signal.SIGKILL)})
    hung.failures[1].timestamp = hung.failures[0].timestamp + 33
    assert _launcher.summary(hung).splitlines()[2].startswith(
        "  rank 1: killed by signal 9 (SIGKILL) (33 s after the first failure: torchrun kills a process that has not "
        "exited 30 s after the SIGTERM it sends once another rank has failed, so this one was hung or stopped;")

    passed_on = []
    hook = _launcher._failed_ranks_in_a_few_lines(lambda *args: passed_on.append(args))
    hook(ChildFailedError, error, None)
    assert capsys.readouterr().err.splitlines()[1] == f"  ranks 0-2: {config_error}" and not passed_on
    other_job = ChildFailedError("train.py", {0: failure(6, 1, "Traceback (most recent call last):\nboom")})
    hook(ChildFailedError, other_job, None)
    assert passed_on and passed_on[-1][1] is other_job and not capsys.readouterr().err
    monkeypatch.setenv("LETRECIPES_TRACEBACK", "1")
    hook(ChildFailedError, error, None)
    assert passed_on[-1][1] is error and not capsys.readouterr().err
    hook(ValueError, ValueError("x"), None)
    assert passed_on[-1][1].args == ("x",)
    installed = sys.excepthook
    _launcher.install()  # again (import letrecipes runs it; the .pth already did): not chained twice
    assert sys.excepthook is installed


@pytest.mark.parametrize("entry", ["export", "eval", "eval, its console closing"])
def test_ctrl_c_during_an_export_or_an_evaluation_is_one_line(entry, teacher_dir, corpus_dir, tmp_path):
    """Ctrl-C during `letrecipes export` (minutes for a 7B checkpoint) or the eval recipe ended in a
    KeyboardInterrupt traceback from wherever it was; the eval recipe's console closing
    (`| head`), in a BrokenPipeError traceback."""
    import signal

    final = str(teacher_dir)  # a Hugging Face folder
    if entry == "export":  # the work itself held up, so that the signal lands inside it
        script = ("import sys, time\nfrom letrecipes.components import export\n"
                  "def slow(*args, **kwargs):\n    print('working', flush=True); time.sleep(60)\n"
                  "export.export_any = slow\nfrom letrecipes import cli\n"
                  f"sys.exit(cli.main(['export', {final!r}, {str(tmp_path / 'out')!r}]))\n")
        expected = "error: stopped by SIGINT during letrecipes export. Nothing half-written is left"
    else:
        script = ("import sys, time\nfrom letrecipes import eval as recipe\n"
                  "def slow(self):\n    print('working', flush=True)\n"
                  "    for _ in range(300):  # a line every 0.2 s: one comes after the console closed\n"
                  "        time.sleep(0.2); print('scoring', flush=True)\n"
                  "recipe.EvalRecipe.evaluate = slow\n"
                  f"sys.exit(recipe.recipe_main(['--config', 'eval', 'checkpoint={final}', 'tasks=[]', "
                  f"'perplexity=[{corpus_dir}]', 'contamination=false']))\n")
        expected = ("error: stopped by its console closing (a write to stdout failed: [Errno 32] Broken pipe"
                    if "console" in entry else "error: stopped by SIGINT while evaluating. What it wrote is whole")
    run = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    try:
        for line in run.stdout:  # EOF (the process ended early) fails below
            if line.strip() == "working":
                break
        if "console" in entry:
            run.stdout.close()  # what `| head -1` does after its line
            err = run.stderr.read()
            run.wait(timeout=50)
        else:
            run.send_signal(signal.SIGINT)
            _, err = run.communicate(timeout=50)
    finally:
        run.kill()
    assert run.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(expected), err[-2000:]
    assert not (tmp_path / "out").exists()
