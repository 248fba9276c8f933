"""Issue 6: kill and resume, atomic checkpoints, the divergence guard, reproducibility.

Runs are real `tune run` subprocesses killed with SIGKILL (through the recipes' `debug.*`
fault-injection keys, or from outside at a random moment); the resumed run must match an
uninterrupted one step for step.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from letrecipes.components.metrics import read_metrics
from tests.launch import recipe_command
from tests.test_hostile_input import digest

REPO = Path(__file__).resolve().parents[1]
KEYS = ("loss", "nll", "lr", "val_loss", "align_loss", "lambda", "cosine")


def tune(recipe, *overrides, nproc=1, timeout=300, max_restarts=0):
    cmd = recipe_command(recipe, "--config", "let_tiny" if recipe == "let_pretrain" else "pretrain_tiny", *overrides,
                         nproc=nproc, max_restarts=max_restarts)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get(
        "OMP_NUM_THREADS", "2"), "PYTHONHASHSEED": "0"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def history(run_dir):
    """Every logged figure by step: what must match between an interrupted and a straight run."""
    return {r["step"]: {k: r[k] for k in KEYS if r.get(k) is not None}
            for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    return wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)


class LetRun:
    """A tiny LET run (10 steps, checkpoints every 3, lambda 0 after step 6) in ``out``."""

    def __init__(self, overrides):
        self.common = [*overrides, "max_steps=10", "save_every=3", "eval_every=5", "log_every=1",
                       "keep_last_checkpoints=1", "alignment.schedule.stop=6"]

    def __call__(self, out, *extra, nproc=1, check=True, max_restarts=0):
        result = tune("let_pretrain", *self.common, f"output_dir={out}", *extra, nproc=nproc, max_restarts=max_restarts)
        if check:
            assert result.returncode == 0, result.stdout[-2000:] + crash_report(result.stderr)
        return result


def crash_report(stderr: str) -> str:
    """The end of a failed run's stderr, and, where a process died of a fatal error (a
    SIGABRT at exit), Python's dump of every thread's stack from its start: the tail alone
    holds only the list of extension modules that ends the dump."""
    start = stderr.find("Fatal Python error")
    dump = stderr[start:start + 6000] + "\n...\n" if start >= 0 else ""
    return dump + stderr[-3000:]


@pytest.fixture(scope="module")
def let_run(let_overrides):
    return LetRun(let_overrides)


@pytest.fixture(scope="module")
def straight_run(let_run, tmp_path_factory):
    """``straight_run(nproc)``: the uninterrupted run on that many processes, the one an
    interrupted and resumed run must match; made once for the tests that compare with it."""
    runs = {}

    def run_on(nproc: int = 1) -> Path:
        if nproc not in runs:
            runs[nproc] = tmp_path_factory.mktemp(f"straight_{nproc}_processes")
            let_run(runs[nproc], nproc=nproc)
        return runs[nproc]

    return run_on


@pytest.mark.xdist_group("straight_on_1_process")  # straight_run is made once per worker
def test_sigkill_mid_step_and_mid_save_then_resume_matches_a_straight_run(let_run, straight_run, tmp_path):
    straight = straight_run()
    killed = tmp_path / "killed"
    # 1) killed at the start of step 5 (last complete checkpoint: step 3)
    first = let_run(killed, "debug.kill_at_step=5", check=False)
    assert first.returncode != 0
    with open(killed / "metrics.jsonl", "a") as f:  # as if the kill had cut a record short
        f.write('{"step": 5, "nll": 4.')
    # 2) resumed, then killed while writing the step-6 checkpoint: shards on disk, no COMPLETE marker
    second = let_run(killed, "resume=true", "debug.kill_during_save_at_step=6", check=False)
    assert second.returncode != 0 and "resumed from" in second.stdout
    leftovers = [p.name for p in (killed / "checkpoints").iterdir()]
    assert "step_00000006.tmp" in leftovers and "step_00000003" in leftovers  # keep_last=1: 3 kept, 6 incomplete
    # 3) resumed again: the incomplete save is ignored, named, and the run finishes
    third = let_run(killed, "resume=true")
    assert "ignoring" in third.stdout and "step_00000006.tmp" in third.stdout
    assert "resumed from" in third.stdout and "step_00000003" in third.stdout
    assert history(killed) == history(straight)  # every step, lambda and cosine included, exactly
    assert same_weights(killed, straight)


@pytest.mark.xdist_group("straight_on_1_process")  # straight_run is made once per worker
def test_killed_before_its_first_checkpoint_resume_starts_over(let_run, straight_run, tmp_path):
    """The case a random kill can land in: metrics written, no checkpoint yet. resume=true
    says so and starts over; the result is the straight run's."""
    straight, killed = straight_run(), tmp_path / "killed"
    assert let_run(killed, "debug.kill_at_step=2", check=False).returncode != 0
    assert (killed / "metrics.jsonl").is_file() and not (killed / "checkpoints").exists()
    again = let_run(killed, "resume=true")
    assert "holds no complete checkpoint: starting fresh" in again.stdout
    assert history(killed) == history(straight) and same_weights(killed, straight)


@pytest.mark.xdist_group("straight_on_1_process")  # straight_run is made once per worker
def test_sigterm_finishes_the_step_saves_and_resumes_exactly(let_run, straight_run, tmp_path):
    """A scheduler's SIGTERM at step 5 (save_every=3): step 5 finishes, is saved, the run
    exits non-zero with the command to resume; resuming matches a straight run."""
    straight, stopped = straight_run(), tmp_path / "stopped"
    result = let_run(stopped, "debug.sigterm_at_step=5", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "SIGTERM received: finishing this step" in result.stdout
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: stopped by SIGTERM after step 5") and "resume=true" in message
    assert (stopped / "checkpoints" / "step_00000005" / "COMPLETE").is_file()
    assert not (stopped / "final").exists()
    let_run(stopped, "resume=true")
    assert history(stopped) == history(straight) and same_weights(stopped, straight)


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_both_at_the_same_saved_step(let_run, tmp_path):
    result = let_run(tmp_path, "debug.sigterm_at_step=5", "debug.rank=1", nproc=2, check=False)
    assert result.returncode != 0
    assert "stopped by a signal on another rank after step 5" in result.stderr  # rank 0 agrees on the step
    assert (tmp_path / "checkpoints" / "step_00000005" / "COMPLETE").is_file()


@pytest.mark.xdist_group("straight_on_1_process")  # straight_run is made once per worker
def test_sigkill_at_a_random_moment(let_run, straight_run, tmp_path):
    straight, killed = straight_run(), tmp_path / "killed"
    delay = random.Random(7).uniform(4.0, 9.0)  # startup takes a few seconds: lands in training or a save
    proc = subprocess.Popen([sys.executable, "-m", "torchtune._cli.tune", "run", "letrecipes/let_pretrain",
                             "--config", "let_tiny", *let_run.common, f"output_dir={killed}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    let_run(killed, "resume=true")
    assert history(killed) == history(straight)
    assert same_weights(killed, straight)


@pytest.mark.slow
@pytest.mark.xdist_group("straight_on_2_processes")  # straight_run is made once per worker
def test_two_process_job_exits_when_a_rank_dies_and_resumes(let_run, straight_run, tmp_path):
    straight, killed = straight_run(nproc=2), tmp_path / "killed"
    start = time.monotonic()
    dead = let_run(killed, "debug.kill_at_step=5", "debug.rank=1", nproc=2, check=False)
    assert dead.returncode != 0 and time.monotonic() - start < 120  # the whole job stops, no hang
    let_run(killed, "resume=true", nproc=2)
    assert history(killed) == history(straight)


@pytest.mark.slow
def test_a_signal_between_sync_points_stops_every_rank_within_two_steps(let_run, tmp_path):
    """Ranks agreed on a stop only at log and save steps, up to log_every steps after the
    signal; they now vote every step (over the CPU backend, read a step later)."""
    result = let_run(tmp_path, "debug.sigterm_at_step=5", "debug.rank=1", "log_every=100", "save_every=4",
                     "eval_every=0", "max_steps=12", nproc=2, check=False)
    assert result.returncode != 0
    assert "stopped by a signal on another rank after step 6" in result.stderr, result.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "step_00000006" / "COMPLETE").is_file()  # not the next save step, 8


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_a_step_and_the_job_resumes(base_overrides, tmp_path):
    """What a scheduler does: SIGTERM to torchrun (srun's task), which passes it to every
    process and kills them 30 s later. The processes finish a step, save it, and stop."""
    out = tmp_path / "run"
    args = ["--config", "pretrain_tiny", *base_overrides, f"output_dir={out}", "log_every=100000", "save_every=25",
            "eval_every=0"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(recipe_command("pretrain", *args, "max_steps=100000", nproc=2), cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step_00000025" / "COMPLETE").is_file():  # training, between log steps
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
            time.sleep(0.2)
        job.send_signal(signal.SIGTERM)
        stdout, stderr = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode != 0
    stopped = [line for line in stderr.splitlines() if line.startswith("error: stopped by SIGTERM after step ")]
    assert len(stopped) == 1, stderr[-3000:]
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()
    # the launcher's own ending: one line after the ranks', not torchrun's SignalException traceback
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith(
        "error: the launcher was stopped by SIGTERM; it passed the signal on to its processes"), stderr[-3000:]
    done = subprocess.run(recipe_command("pretrain", *args, f"max_steps={step + 2}", "resume=true", nproc=2),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"resumed from {out / 'checkpoints' / f'step_{step:08d}'}" in done.stdout, \
        done.stderr[-3000:]


def processes_running(marker: str) -> list:
    """Pids of the processes whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # ended meanwhile
            pass
    return found


def test_ranks_whose_launcher_dies_save_a_step_and_exit(base_overrides, tmp_path):
    """torchrun starts each rank in a session of its own: a launcher killed outright (SIGKILL,
    the OOM killer, a SIGUSR1 it has no handler for) left its ranks training on as orphans,
    holding the run's lock. Each rank now has the kernel's SIGTERM when its launcher dies."""
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(recipe_command("pretrain", "--config", "pretrain_tiny", *base_overrides,
                                          f"output_dir={out}", "log_every=100000", "save_every=25", "eval_every=0",
                                          "max_steps=100000", nproc=2),
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step_00000025" / "COMPLETE").is_file():
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
            time.sleep(0.2)
        job.kill()  # the launcher alone: its ranks are in sessions of their own
        stdout, stderr = job.communicate(timeout=90)  # the ranks hold the pipes until they exit
    finally:
        job.kill()
        for pid in processes_running(f"output_dir={out}"):  # an orphan must not outlive a failed test
            os.kill(pid, signal.SIGKILL)
    assert "SIGTERM received" in stdout, stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if line.startswith("error: stopped by SIGTERM (the launcher has "
                                                                      "died) after step ")]
    assert len(stopped) == 1, stderr[-3000:]
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert step > 25 and (out / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()
    assert not processes_running(f"output_dir={out}")


@pytest.mark.slow
def test_a_process_that_hangs_stops_the_job_with_one_line_after_the_timeout(let_run, tmp_path):
    """Rank 1 stops (SIGSTOP: alive, silent). Rank 0 waited in its next collective until
    process_group_timeout_s, then died of gloo's traceback; it now says what happened."""
    # about 60 s: the 20 s wait, then the 30 s torchrun waits before it kills the stopped rank (after a failure that
    # wait is fixed in torch 2.13: --shutdown-timeout and TORCH_ELASTIC_SHUTDOWN_TIMEOUT set the one after a signal)
    start = time.monotonic()
    result = let_run(tmp_path, "debug.hang_at_step=5", "debug.rank=1", "process_group_timeout_s=20", nproc=2,
                     check=False)
    assert result.returncode != 0 and time.monotonic() - start < 120
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 0 waited 20 s (process_group_timeout_s) for "
                                                     "another process that never joined the collective"), \
        result.stderr[-3000:]
    assert "at step 5" in errors[0] and "step_00000003" in errors[0] and "resume=true" in errors[0]
    assert "[rank0]: Traceback" not in result.stderr and "[rank0]: RuntimeError" not in result.stderr
    # the stopped rank, killed by torchrun 30 s after its SIGTERM, is said to have hung (not the out-of-memory killer)
    assert "rank 1: killed by signal 9 (SIGKILL) (" in result.stderr and "so this one was hung or stopped" in \
        result.stderr, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.xdist_group("straight_on_2_processes")  # straight_run is made once per worker
def test_torchruns_own_restart_goes_on_from_the_last_checkpoint(let_run, straight_run, tmp_path):
    """`--max-restarts`: torchrun starts every process again with the same arguments. Without
    resume=true each restart refused the run's own folder ("already holds a run"), so the
    restarts were spent failing; a restart of the same job now resumes, and with
    overwrite=true it no longer starts over (the fault fires in the first attempt only)."""
    straight, restarted = straight_run(nproc=2), tmp_path / "restarted"
    result = let_run(restarted, "debug.kill_at_step=5", "debug.rank=1", "overwrite=true", nproc=2, max_restarts=1)
    assert "torchrun restart 1 of this job" in result.stdout and "overwrite=true applied to its first start only" \
        in result.stdout
    assert "resumed from" in result.stdout and "step_00000003" in result.stdout
    assert history(restarted) == history(straight)


def test_a_restart_resumes_only_the_job_that_wrote_the_folder(tmp_path, monkeypatch):
    from letrecipes.components import run_info

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    (tmp_path / "run_info.json").write_text(json.dumps({"launcher_job": run_info.launcher_job()}))
    assert run_info.restart_of(tmp_path) == 0  # the first attempt is no restart
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert run_info.restart_of(tmp_path) == 2
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")  # another job, restarted, finds job-a's run: not its own
    assert run_info.restart_of(tmp_path) == 0
    assert run_info.restart_of(tmp_path / "nothing_here") == 0
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    assert run_info.launcher_job() is None


def test_nan_stops_with_the_step_and_the_last_good_checkpoint(let_run, tmp_path):
    result = let_run(tmp_path, "debug.nan_loss_at_step=5", check=False)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: non-finite loss or gradient norm at step 5")
    assert "step_00000003" in message and "Traceback" not in result.stderr
    assert (tmp_path / "checkpoints" / "step_00000003" / "COMPLETE").is_file()  # nothing written is damaged


def test_nan_between_sync_points_is_named_at_the_next_one_before_any_save(let_run, tmp_path):
    """Without a host sync per step, a NaN at step 5 (log_every=4) is read at step 6, a
    checkpoint step: the run stops there, names step 5, and step 6 is never saved."""
    result = let_run(tmp_path, "log_every=4", "eval_every=0", "debug.nan_loss_at_step=5", check=False)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: non-finite loss or gradient norm at step 5") and "step_00000003" in message
    assert not (tmp_path / "checkpoints" / "step_00000006").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [4]


def test_nan_skip_policy_drops_the_update_and_goes_on(let_run, tmp_path):
    let_run(tmp_path, "debug.nan_loss_at_step=5", "divergence.policy=skip")
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert any(r.get("event") == "skipped_update" and r["step"] == 5 for r in records)
    assert [r["step"] for r in records if "loss" in r and "event" not in r] == list(range(1, 11))
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r and r["step"] != 5)  # finite elsewhere


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank(let_run, tmp_path):
    start = time.monotonic()
    result = let_run(tmp_path, "debug.nan_loss_at_step=4", "debug.rank=1", nproc=2, check=False)
    assert result.returncode != 0 and time.monotonic() - start < 120
    assert "non-finite loss or gradient norm at step 4" in result.stderr


def test_same_seed_same_losses_and_the_run_is_traceable(let_run, tmp_path):
    first = let_run(tmp_path / "a")
    let_run(tmp_path / "b")
    assert history(tmp_path / "a") == history(tmp_path / "b")
    assert any(line.startswith("run: git ") for line in first.stdout.splitlines())
    info = json.loads((tmp_path / "a" / "run_info.json").read_text(encoding="utf-8"))
    assert info["packages"]["torch"].startswith("2.") and info["config"]["max_steps"] == 10
    assert info["git_revision"] is None or len(info["git_revision"].split("+")[0]) == 40
    # the last digits of a loss depend on the processor's kernels: which one ran is recorded
    assert info["hardware"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and \
        info["hardware"]["cpu_threads"] >= 1 and set(info["hardware"]["cpu_flags"]) <= {
            "avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16"}
    for ckpt in (tmp_path / "a" / "checkpoints").iterdir():
        assert json.loads((ckpt / "run_info.json").read_text(encoding="utf-8"))["config"] == info["config"]


def test_resume_with_another_model_shape_damages_nothing(let_run, tmp_path):
    let_run(tmp_path, "max_steps=3")
    before = digest(tmp_path)
    result = let_run(tmp_path, "resume=true", "max_steps=6", "model.num_layers=3", check=False)
    assert result.returncode == 1 and "was written by a different run: model.num_layers" in result.stderr
    assert "Traceback" not in result.stderr
    assert digest(tmp_path) == before


@pytest.mark.slow
@pytest.mark.xdist_group("straight_on_2_processes")  # straight_run is made once per worker
def test_two_process_job_killed_mid_save_resumes_from_the_previous_checkpoint(let_run, straight_run, tmp_path):
    straight, killed = straight_run(nproc=2), tmp_path / "killed"
    dead = let_run(killed, "debug.kill_during_save_at_step=6", nproc=2, check=False)
    assert dead.returncode != 0
    assert (killed / "checkpoints" / "step_00000006.tmp").is_dir()  # shards of both ranks, never marked complete
    resumed = let_run(killed, "resume=true", nproc=2)
    assert "ignoring" in resumed.stdout and "step_00000003" in resumed.stdout
    assert history(killed) == history(straight)


def test_the_revision_of_another_users_checkout_is_recorded_and_nothing_is_written(tmp_path):
    """A lab's shared checkout, run by another user: git refuses it ("dubious ownership") and
    the run recorded no revision ("git unknown (not a git checkout)"). Nor does reading it
    take git's index lock, which a `git commit` of the owner's at that moment needs."""
    import os
    import shutil
    import subprocess

    from letrecipes.components.run_info import git_revision

    if shutil.which("git") is None or os.geteuid() != 0:
        pytest.skip("needs git, and root to give the checkout to another user")
    repo = tmp_path / "shared"
    repo.mkdir()
    (repo / "tracked.txt").write_text("a")
    for command in (["init", "-q"], ["add", "tracked.txt"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit",
                                                             "-q", "-m", "x"]):
        subprocess.run(["git", *command], cwd=repo, check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    (repo / "tracked.txt").write_text("b")
    for root, folders, files in os.walk(repo):
        for name in [root, *(os.path.join(root, f) for f in folders + files)]:
            os.lchown(name, 4242, 4242)  # another user's: root's git refuses it too
    index = (repo / ".git" / "index").stat()
    assert git_revision(repo) == head + "+dirty"
    assert (repo / ".git" / "index").stat().st_mtime_ns == index.st_mtime_ns
