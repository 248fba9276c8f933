"""FSDP2 with 2 processes on gloo, float8, compile and activation checkpointing (CPU)."""

import os
import re
import subprocess
import sys

import pytest

from letrecipes.components.metrics import read_metrics
from tests.launch import needs_compile, recipe_command

pytestmark = pytest.mark.slow


def tune_run_2proc(recipe, config, *overrides, timeout=300, nproc=2, check=True, via_tune=False):
    """The recipe on 2 processes (torchrun, as `tune run --nproc_per_node 2` starts it) on a
    rendezvous port of its own, with a time limit."""
    cmd = recipe_command(recipe, "--config", config, *overrides, nproc=nproc, via_tune=via_tune)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    # a rank that aborted: its thread stacks (faulthandler's, from "Fatal Python error"), which the last
    # 5,000 characters lose under the list of modules that follows them
    fatal = result.stderr.find("Fatal Python error")
    assert result.returncode == 0 or not check, result.stdout[-3000:] + result.stderr[-5000:] + (
        f"\n--- from the fatal error on:\n{result.stderr[fatal:fatal + 6000]}" if fatal >= 0 else "")
    return result


def launcher_summary(stderr: str, error: str) -> list:
    """The launcher's summary of a failed 2-process job (letrecipes/_launcher.py), checked to
    name ``error`` under the ranks that stopped on it; the other rank, if any, is one torchrun
    stopped (SIGTERM) once the first had failed, which depends on timing alone."""
    lines = stderr.splitlines()
    head = next(i for i, line in enumerate(lines) if re.match(r"\S+ failed on 2 processes of this node", line))
    said = lines[head + 1:]
    assert (said[0].startswith(f"  ranks 0-1: {error}") and len(said) == 1
            or re.fullmatch(r"  rank [01]: " + re.escape(error) + ".*", said[0]) and len(said) == 2
            and re.fullmatch(r"  rank [01]: stopped by the launcher \(SIGTERM\) once another rank had failed",
                             said[1])), lines[head:]
    return lines[head:]


def losses(path, key="loss"):
    return [(r["step"], r[key]) for r in read_metrics(path / "metrics.jsonl") if r.get(key) is not None]


def test_fsdp_let_run_releases_the_teacher_and_a_sharded_teacher_resumes_to_the_same_losses(let_overrides, tmp_path):
    """2 processes (through `tune run`): the teacher is released at S_stop. The same run with
    the teacher sharded (FSDP2) like the student, stopped after step 3 and resumed, has the
    replicated straight run's losses: sharding the teacher changes no figure, and a resume
    none either."""
    common = [*let_overrides, "max_steps=6", "alignment.schedule.stop=5", "eval_every=3"]
    straight = tune_run_2proc("let_pretrain", "let_tiny", *common, f"output_dir={tmp_path / 'a'}", via_tune=True)
    assert "2 process(es)" in straight.stdout and "FSDP2" in straight.stdout
    records = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("event") == "teacher_released"] == [5]
    assert (tmp_path / "a" / "final" / "model.safetensors").is_file()

    sharded = [*common, f"output_dir={tmp_path / 'b'}", "save_every=3", "teacher.placement=sharded"]
    assert "sharded over 2 ranks" in tune_run_2proc("let_pretrain", "let_tiny", *sharded).stdout
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")
    tune_run_2proc("let_pretrain", "let_tiny", *sharded, "resume=true")
    for key in ("loss", "align_loss", "val_loss"):
        a, b = losses(tmp_path / "a", key), losses(tmp_path / "b", key)
        assert [s for s, _ in a] == [s for s, _ in b] and a
        assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-5), key


def test_float8_under_fsdp_stays_close_to_bf16(let_overrides, tmp_path):
    common = [*let_overrides, "max_steps=3", "dtype=bf16", "eval_every=0"]
    tune_run_2proc("let_pretrain", "let_tiny", *common, f"output_dir={tmp_path / 'bf16'}")
    fp8 = tune_run_2proc("let_pretrain", "let_tiny", *common, f"output_dir={tmp_path / 'fp8'}", "float8.enabled=true",
                         "float8.fsdp_float8_all_gather=true")
    assert "float8 tensorwise" in fp8.stdout
    assert "float8.enabled=true on a CPU: torch has no fast float8 matmul there" in fp8.stdout + fp8.stderr
    a, b = losses(tmp_path / "bf16"), losses(tmp_path / "fp8")
    assert len(a) == len(b) == 3
    for (_, x), (_, y) in zip(a, b):
        assert y == y and abs(x - y) < 0.05 * abs(x)


@pytest.mark.parametrize("version", ["0.10.0", "0.11.0"])
def test_float8_with_a_torchao_whose_float8_export_fails_stops_before_any_step(monkeypatch, version):
    """torchao 0.10 and 0.11 under torch 2.13: a sharded float8 run trained, then its export
    failed (torch.load refuses torchao's WeightWithDynamicFloat8CastTensor)."""
    import importlib.metadata

    import torch

    from letrecipes.components import parallel
    from letrecipes.components.registry import ComponentError

    installed = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == "torchao" else installed(name))
    with pytest.raises(ComponentError, match=rf"^float8.enabled=true needs torchao 0\.13 or later; {version} is "
                                             r"installed\. Fix: pip install 'torchao>=0\.13,<0\.16' .*, or float8.enabled=false"):
        parallel.parallelize(torch.nn.Sequential(torch.nn.Linear(16, 16)), torch.device("cpu"), False, None,
                             {"enabled": True, "emulate": True}, {}, False, {}, seed=0)


def test_float8_on_a_gpu_without_float8_tensor_cores_stops_before_any_step(monkeypatch):
    """torch's float8 matmul raises on an A100 (8.0) at the first step, after the model is
    built and compiled (minutes at 7B); now the check at setup names the GPU and the fix."""
    import torch

    from letrecipes.components import parallel
    from letrecipes.components.registry import ComponentError

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ComponentError, match=r"float8.enabled=true needs float8 tensor cores \(compute capability 8.9 "
                       r"or higher: H100, H200, L40S, RTX 4090\); NVIDIA A100-SXM4-80GB has 8.0. Fix: "
                       r"float8.enabled=false \(bf16\), or float8.emulate=true"):
        parallel.check_float8_device(torch.device("cuda", 0))
    for capability in ((8, 9), (9, 0), (10, 0)):  # L40S, H100, B200
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        parallel.check_float8_device(torch.device("cuda", 0))
    with pytest.raises(ComponentError, match="float8.enabled=true needs float8 tensor cores"):  # through the recipe's call
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        parallel.parallelize(torch.nn.Linear(16, 16, device="meta"), torch.device("cuda", 0), False, None,
                             {"enabled": True}, {}, False, {}, seed=0)
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # emulated on a CPU: fast, so nothing to say
        warnings.simplefilter("always")
        parallel.parallelize(torch.nn.Sequential(torch.nn.Linear(16, 16)), torch.device("cpu"), False, None,
                             {"enabled": True, "emulate": True}, {}, False, {}, seed=0)
    assert not [w for w in caught if "float8" in str(w.message)]
    with pytest.warns(UserWarning, match="float8.enabled=true on a CPU: torch has no fast float8 matmul"):
        parallel.check_float8_device(torch.device("cpu"))


def test_bf16_on_a_gpu_without_bf16_tensor_cores_is_said_with_the_fix(monkeypatch, teacher_dir):
    """A V100 or a T4 (compute capability 7.x) has no bf16 tensor cores, and bf16 is the
    default dtype of the student and of the teacher: each is said once at setup with the
    setting that uses the card (no GPU here: the capability is monkeypatched)."""
    import torch

    from letrecipes.components import parallel
    from letrecipes.components.teachers import load_teacher

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with pytest.warns(UserWarning, match=r"dtype=bf16 on Tesla V100-SXM2-32GB \(compute capability 7.0\), which has no "
                      r"bf16 tensor cores .* Fix: dtype=fp32 \(float16 training would need loss scaling"):
        parallel.check_bf16_device(torch.device("cuda", 0), "dtype")
    with pytest.warns(UserWarning, match=r"teacher.dtype=bf16 on Tesla V100.* Fix: teacher.dtype=fp16 \(a frozen"):
        with pytest.raises(Exception):  # the load itself needs the GPU this machine does not have
            load_teacher({"path": str(teacher_dir)}, "cuda:0")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for capability in ((8, 0), (8, 6), (9, 0)):  # A100, A10/RTX 3090, H100
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
            parallel.check_bf16_device(torch.device("cuda", 0))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
        monkeypatch.setattr(parallel, "cpu_bf16_slowdown", lambda: 1.0)  # a CPU with bf16 instructions
        parallel.check_bf16_device(torch.device("cpu"))
        load_teacher({"path": str(teacher_dir), "dtype": "fp16"}, "cpu")  # fp16 asked: nothing to say


@needs_compile
def test_compile_and_activation_checkpointing_match_eager(let_overrides, tmp_path, capsys):
    from letrecipes import let_pretrain

    common = [*let_overrides, "max_steps=3", "eval_every=0"]
    let_pretrain.recipe_main(["--config", "let_tiny", *common, f"output_dir={tmp_path / 'eager'}"])
    assert "compiles the blocks" not in capsys.readouterr().out
    let_pretrain.recipe_main(["--config", "let_tiny", *common, f"output_dir={tmp_path / 'compiled'}", "compile=true",
                              "teacher.compile=true", "activation_checkpointing.mode=selective",
                              "activation_checkpointing.every=2"])
    assert "step 1 compiles the blocks first" in capsys.readouterr().out  # before a first step that looks hung
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-4)


def test_fsdp_in_one_process_runs_the_sharded_path_and_resumes_exactly(let_overrides, tmp_path, capsys):
    """fsdp.enabled=true at world size 1 (a group of one): the code path of a sharded run on
    one GPU, here on CPU. It trains like the unsharded recipe (whose weights are initialised
    from another random stream: the sharded model is initialised after sharding) and
    resumes exactly."""
    import shutil

    from letrecipes import let_pretrain

    common = [*let_overrides, "max_steps=6", "alignment.schedule.stop=5", "eval_every=3"]
    let_pretrain.recipe_main(["--config", "let_tiny", *common, f"output_dir={tmp_path / 'plain'}"])
    sharded = [*common, "fsdp.enabled=true", "teacher.placement=sharded"]
    let_pretrain.recipe_main(["--config", "let_tiny", *sharded, f"output_dir={tmp_path / 'a'}"])
    assert "FSDP2" in capsys.readouterr().out
    assert (tmp_path / "a" / "final" / "model.safetensors").is_file()
    plain, a = losses(tmp_path / "plain"), losses(tmp_path / "a")
    assert [s for s, _ in plain] == [s for s, _ in a]
    assert [v for _, v in plain] == pytest.approx([v for _, v in a], rel=0.01)

    # async saves: DCP stages the state on the CPU and needs a CPU backend in the group
    let_pretrain.recipe_main(["--config", "let_tiny", *sharded, "save_every=3", "async_checkpoint=true",
                              f"output_dir={tmp_path / 'b'}"])
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000006")
    let_pretrain.recipe_main(["--config", "let_tiny", *sharded, "save_every=3", f"output_dir={tmp_path / 'b'}",
                              "resume=true"])
    for key in ("loss", "align_loss", "val_loss"):
        a, b = losses(tmp_path / "a", key), losses(tmp_path / "b", key)
        assert [s for s, _ in a] == [s for s, _ in b] and a
        assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-5), key


def test_a_run_resumes_on_another_number_of_processes_with_the_same_losses(base_overrides, tmp_path):
    """A node lost, a smaller allocation: 2 processes -> 1 with twice the accumulation, and
    1 -> 2 with half, read the same sequences per step (the data goes on after the ones all
    ranks read; DCP reshards weights and optimizer, FSDP2 to none and back), so the losses
    are a straight run's. It used to be refused ("written by 2 process(es)")."""
    import shutil

    from letrecipes import pretrain

    common = [*base_overrides, "eval_every=0", "save_every=3", "batch_size=4"]

    def one_process(out, *extra):
        pretrain.recipe_main(["--config", "pretrain_tiny", *common, f"output_dir={tmp_path / out}", *extra])

    def two_processes(out, *extra):
        return tune_run_2proc("pretrain", "pretrain_tiny", *common, f"output_dir={tmp_path / out}", *extra)

    def up_to_step_3(straight, copy):  # a run stopped at its step-3 checkpoint: the straight run's folder without step 6
        shutil.copytree(tmp_path / straight, tmp_path / copy)
        shutil.rmtree(tmp_path / copy / "checkpoints" / "step_00000006")

    two_processes("straight2", "max_steps=6")
    up_to_step_3("straight2", "shrunk")
    one_process("shrunk", "max_steps=6", "resume=true", "gradient_accumulation_steps=2")
    one_process("straight1", "max_steps=6", "gradient_accumulation_steps=2")
    up_to_step_3("straight1", "grown")
    grown = two_processes("grown", "max_steps=6", "resume=true")
    assert ("resume: world_size 1 -> 2" in grown.stdout and "resume: the data goes on after the 24 sequences of "
            "epoch 1 read before (each once); tokens per step 256 -> 256" in grown.stdout), grown.stdout[-2000:]
    # the epoch that began on another world size goes on from its checkpoints as any other
    one_process("straight1", "max_steps=8", "resume=true", "gradient_accumulation_steps=2")
    two_processes("grown", "max_steps=8", "resume=true")
    for straight, resumed, steps in (("straight2", "shrunk", 6), ("straight1", "grown", 8)):
        a, b = losses(tmp_path / straight), losses(tmp_path / resumed)
        assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, steps + 1))
        assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-5, abs=0), (straight, a, b)


def test_hsdp_2x2_trains_like_fsdp_on_2_ranks_and_resumes_exactly(base_overrides, tmp_path):
    """HSDP on 4 gloo processes (2 replicas x 2 shards, micro-batch 1, 2 accumulated: the
    all-reduce across replicas runs at the second micro-batch only) sees the same global
    batches as plain FSDP2 on 2 processes (micro-batch 4) and starts from the same shards:
    the same losses. Then a resume continues it exactly."""
    import shutil

    common = [*base_overrides, "max_steps=4", "eval_every=0"]
    tune_run_2proc("pretrain", "pretrain_tiny", *common, "batch_size=4", f"output_dir={tmp_path / 'fsdp'}")
    hsdp = [*common, "batch_size=1", "gradient_accumulation_steps=2", "fsdp.replicate_degree=2", "save_every=2"]
    out = tune_run_2proc("pretrain", "pretrain_tiny", *hsdp, f"output_dir={tmp_path / 'hsdp'}", nproc=4)
    assert "HSDP replicate 2 x shard 2" in out.stdout
    a, b = losses(tmp_path / "fsdp"), losses(tmp_path / "hsdp")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-4)
    shutil.rmtree(tmp_path / "hsdp" / "checkpoints" / "step_00000004")
    shutil.copytree(tmp_path / "hsdp", tmp_path / "hsdp_then_fsdp")
    tune_run_2proc("pretrain", "pretrain_tiny", *hsdp, f"output_dir={tmp_path / 'hsdp'}", "resume=true", nproc=4)
    resumed = losses(tmp_path / "hsdp")
    assert [s for s, _ in resumed] == [1, 2, 3, 4]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in b], rel=1e-5)
    # the step-2 checkpoint of HSDP on 4 processes goes on as plain FSDP2 on 2 (the same tokens a step):
    # DCP reshards it, and the losses are the straight FSDP2 run's (this was checked by hand before)
    moved = tune_run_2proc("pretrain", "pretrain_tiny", *common, "batch_size=4", "resume=true",
                           f"output_dir={tmp_path / 'hsdp_then_fsdp'}")
    assert "resume: world_size 4 -> 2" in moved.stdout, moved.stdout[-2000:]
    then_fsdp = losses(tmp_path / "hsdp_then_fsdp")
    assert [s for s, _ in then_fsdp] == [1, 2, 3, 4]
    assert [v for _, v in then_fsdp] == pytest.approx([v for _, v in a], rel=1e-4)


def test_reducing_once_per_step_trains_like_reducing_every_micro_batch(base_overrides, tmp_path):
    """fsdp.reduce_every_micro_batch=false: 2 ranks, 2 micro-batches a step; the first
    micro-batch's gradients stay unsharded on each rank and the second reduces their sum.
    The same losses as reducing each micro-batch (only the order of the additions differs)."""
    common = [*base_overrides, "max_steps=4", "eval_every=0", "batch_size=2", "gradient_accumulation_steps=2"]
    tune_run_2proc("pretrain", "pretrain_tiny", *common, f"output_dir={tmp_path / 'every'}")
    tune_run_2proc("pretrain", "pretrain_tiny", *common, "fsdp.reduce_every_micro_batch=false",
                   f"output_dir={tmp_path / 'once'}")
    a, b = losses(tmp_path / "every"), losses(tmp_path / "once")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-5)


def test_async_saves_on_two_ranks_train_on_and_resume_to_the_same_losses(base_overrides, tmp_path):
    """An async save runs DCP's collectives in a thread of its own while the training's FSDP2
    collectives go on: on the one default group they came in a different order on each rank,
    and gloo aborted the job (SIGABRT) or it hung, at the first async save, 4 launches out of 4.
    They have a group of their own now."""
    import shutil

    common = [*base_overrides, "max_steps=4", "eval_every=0", "keep_last_checkpoints=all", "save_every=1",
              "async_checkpoint=true", f"output_dir={tmp_path}"]
    tune_run_2proc("pretrain", "pretrain_tiny", *common, timeout=180)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == [f"step_0000000{step}" for step in (1, 2, 3, 4)], saved
    straight = losses(tmp_path)
    for step in (3, 4):
        shutil.rmtree(tmp_path / "checkpoints" / f"step_0000000{step}")
    again = tune_run_2proc("pretrain", "pretrain_tiny", *common, "resume=true", timeout=180)
    assert "step_00000002 at step 2" in again.stdout, again.stdout[-2000:]
    resumed = losses(tmp_path)
    assert [s for s, _ in straight] == [s for s, _ in resumed] == [1, 2, 3, 4]
    assert [v for _, v in straight] == pytest.approx([v for _, v in resumed], rel=1e-6)


def test_gpu_process_groups_carry_a_cpu_backend_for_async_checkpoints():
    import torch

    from letrecipes.components.parallel import process_group_backend

    assert process_group_backend(torch.device("cuda")) == "cuda:nccl,cpu:gloo"
    assert process_group_backend(torch.device("cpu")) == "gloo"


def test_a_gpu_process_group_is_bound_to_the_processs_own_gpu(monkeypatch):
    """Without device_id, NCCL's barrier guessed each rank's GPU from its global rank."""
    import torch
    import torch.distributed as dist

    from letrecipes.components import parallel

    joined = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: joined.update(kwargs))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: joined.setdefault("current", d))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "3")
    parallel.init_distributed(torch.device("cuda"), single_process_group=True)
    assert joined["device_id"] == joined["current"] == torch.device("cuda", 3)
    assert joined["backend"] == "cuda:nccl,cpu:gloo"
    joined.clear()
    parallel.init_distributed(torch.device("cpu"), single_process_group=True)
    assert "device_id" not in joined and joined["backend"] == "gloo"


@pytest.mark.parametrize("env, says", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 in the environment makes this one of 2 processes, but RANK, MASTER_ADDR, "
                          "MASTER_PORT are not set. Fix: start the processes with torchrun"),
    ({"WORLD_SIZE": "two"}, "the environment variable WORLD_SIZE='two' is no whole number. Fix: "),
    ({"WORLD_SIZE": "0"}, "the environment variable WORLD_SIZE=0: a run has 1 process or more"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "RANK=2 in the environment is not one of the 2 ranks 0..1 (WORLD_SIZE=2)"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"},
     "MASTER_PORT=70000 in the environment is no port (1..65535)"),
    ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
     "LOCAL_RANK=2 in the environment is not one of this node's local ranks 0..1 (LOCAL_WORLD_SIZE=2)"),
    # the store's whole timeout of retries, then a C++ stack
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "29500"},
     "MASTER_ADDR=no-such-host.invalid does not resolve to an address ("),
], ids=["world-size-alone", "not-a-number", "zero", "rank-past-the-world", "no-port", "local-rank-past-the-node",
        "unresolved-address"])
def test_launch_variables_left_in_the_environment_are_one_line_before_the_process_group(monkeypatch, env, says):
    """`export WORLD_SIZE=8` in a shell or job script, without torchrun, ended in torch's
    traceback ("environment variable RANK expected") or a wait of process_group_timeout_s."""
    from letrecipes.components import parallel
    from letrecipes.components.registry import ComponentError

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(parallel, "init_distributed", lambda *a, **k: pytest.fail("joined the group first"))
    with pytest.raises(ComponentError) as said:
        parallel.setup_device("cpu")
    assert says in str(said.value)


def test_a_launcher_on_a_host_name_that_does_not_resolve_meets_at_127_0_0_1_on_one_node(monkeypatch, capsys):
    """torchrun gives its processes the node's host name to meet at: unresolved, each waited
    5 minutes and printed a C++ stack, with nothing of letrecipes said; then a warning named
    the fix, and the job still waited (python -m torch.distributed.run, which the tests use,
    was not even recognised). Checked for real in a UTS namespace of its own (unshare -u,
    hostname box-7): a 2-process tiny run through tune and through -m finished in 10 s each."""
    import socket

    from letrecipes import _launcher

    def unresolved(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unresolved)
    monkeypatch.setattr(socket, "gethostname", lambda: "box-7")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    unresolved_name = "this machine's host name 'box-7' does not resolve to an address (Name or service not known)"
    module = ["-m", "--nproc-per-node=2", "letrecipes/pretrain.py"]  # python -m torch.distributed.run, before runpy
    for argv, typed, said, then in (
            # one node: its processes meet at 127.0.0.1, added to the launcher's options (and said)
            (["/venv/bin/tune", "run", "--nproc_per_node", "2", "letrecipes/pretrain"], None, "note",
             ["/venv/bin/tune", "run", "--local-addr", "127.0.0.1", "--nproc_per_node", "2", "letrecipes/pretrain"]),
            (module, ["/venv/bin/python", "-m", "torch.distributed.run", *module[1:]], "note",
             ["-m", "--local-addr", "127.0.0.1", *module[1:]]),  # sys.argv lacks the module: it was never seen
            (["/venv/bin/torchrun", "--nnodes=1:1", "--nproc-per-node=2", "letrecipes/pretrain.py"], None, "note",
             ["/venv/bin/torchrun", "--local-addr", "127.0.0.1", "--nnodes=1:1", "--nproc-per-node=2",
              "letrecipes/pretrain.py"]),
            # several nodes: the address must be one the others reach; said, and left to the user
            (["/venv/bin/tune", "run", "--nnodes", "2", "--nproc_per_node", "2", "letrecipes/pretrain"], None,
             "warning", None),
            (["/venv/bin/tune", "run", "--nproc_per_node", "2", "--local-addr", "127.0.0.1", "letrecipes/pretrain"],
             None, None, None),
            (["/venv/bin/tune", "run", "letrecipes/pretrain"], None, None, None),  # one process: no group
            (["letrecipes/pretrain.py", "--config", "x"], None, None, None)):  # a rank, not its launcher
        monkeypatch.setattr(sys, "argv", list(argv))
        monkeypatch.setattr(sys, "orig_argv", typed or ["/venv/bin/python", *argv])
        _launcher.say_if_the_host_name_does_not_resolve()
        err = capsys.readouterr().err
        assert sys.argv == (then or argv), (argv, sys.argv)
        if said is None:
            assert err == "", (argv, err)
        elif said == "note":
            assert err.startswith(f"note: {unresolved_name}, and torchrun gives it to its processes as the address "
                                  "to meet at; on one node they meet at 127.0.0.1 instead (--local-addr 127.0.0.1 "
                                  "added)."), (argv, err)
            assert os.environ.pop("GLOO_SOCKET_IFNAME") == "lo"
        else:
            assert err.startswith(f"warning: {unresolved_name}") and "--local-addr <address>" in err, (argv, err)
            assert "GLOO_SOCKET_IFNAME" not in os.environ


@pytest.mark.parametrize("rank, says", [("0", "Timed out after"), ("1", "The client socket has timed out")],
                         ids=["first-rank-waiting", "other-rank-connecting"])
def test_peers_that_never_come_are_one_line_naming_the_address_and_the_timeout(monkeypatch, rank, says):
    import torch.distributed as dist

    from letrecipes.components import parallel
    from letrecipes.components.registry import ComponentError
    from tests.launch import free_port

    port = free_port()
    for name, value in {"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ComponentError) as said:
        parallel.setup_device("cpu", timeout_s=2)
    assert str(said.value).startswith(f"process group: rank {rank} of 2 could not gather the others at "
                                      f"127.0.0.1:{port} within process_group_timeout_s=2 (")
    assert says in str(said.value) and not dist.is_initialized()


def test_more_processes_on_a_node_than_gpus_is_one_line_before_the_process_group(monkeypatch):
    """NCCL's setup used to fail with "invalid device ordinal" on the processes past the last GPU."""
    import torch

    from letrecipes.components import parallel
    from letrecipes.components.registry import ComponentError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(parallel, "init_distributed", lambda *a, **k: pytest.fail("joined the group first"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ComponentError, match=r"^4 processes on this node, one GPU each, but torch sees 2 GPU\(s\) "
                                             r"\(CUDA_VISIBLE_DEVICES=0,1\)\. Fix: --nproc_per_node 2 "):
        parallel.setup_device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "0")  # the first process sees it too: every rank stops alike
    with pytest.raises(ComponentError, match="4 processes on this node"):
        parallel.setup_device(None)


def test_slurm_tasks_started_without_torchrun_are_one_line_not_n_lonely_runs(monkeypatch):
    from letrecipes.components import parallel
    from letrecipes.components.registry import ComponentError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")  # a batch script of an 8-task job running one process: fine
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    assert parallel.setup_device("cpu")[1:3] == (0, 1)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")  # srun started 8 copies of the recipe
    with pytest.raises(ComponentError, match=r"^this process is one of 8 Slurm tasks, started without torchrun .* Fix: "
                                             r"start one torchrun per node"):
        parallel.setup_device("cpu")


def test_sharded_init_has_the_from_scratch_statistics(base_overrides, tmp_path):
    """Under FSDP2 the model is built on meta and initialised shard by shard."""
    import math

    from safetensors.torch import load_file

    result = tune_run_2proc("pretrain", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path}", "max_steps=1",
                            "eval_every=0", "optimizer.lr=1e-12", "model.num_layers=8", "model.embed_dim=64",
                            "model.num_heads=4", "model.num_kv_heads=4", "model.intermediate_dim=256",
                            "export.dtype=fp32")
    assert "initialised after sharding" in result.stdout
    weights = load_file(str(tmp_path / "final" / "model.safetensors"))
    q = weights["model.layers.0.self_attn.q_proj.weight"]  # the export is in Hugging Face names
    out = torch_cat([weights[f"model.layers.{i}.self_attn.o_proj.weight"] for i in range(8)])
    assert abs(q.std().item() - 0.02) < 0.002
    assert abs(out.std().item() - 0.02 / math.sqrt(16)) < 0.0006
    half = q.shape[0] // 2  # the two ranks' shards were drawn independently
    assert not (q[:half] == q[half:]).all()
    assert (weights["model.norm.weight"] == 1).all()
    first = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert abs(first["nll"] - math.log(512)) < 0.3  # a fresh model predicts ~uniformly


def torch_cat(tensors):
    import torch

    return torch.cat([t.flatten() for t in tensors])


def test_two_ranks_on_a_mixture_log_the_tokens_of_both(base_overrides, corpus_dir, tmp_path):
    """Each rank counts its own draws; the metrics carry the sum over ranks."""
    plays = sorted(corpus_dir.glob("*.txt"))
    overrides = [o for o in base_overrides if not o.startswith("data.source=")]
    result = tune_run_2proc("pretrain", "pretrain_tiny", *overrides, "~data.source", f"output_dir={tmp_path}",
                            "max_steps=6", "log_every=6", "eval_every=0",
                            f"data.sources=[{{source: {plays[0]}, weight: 1, name: a}}, "
                            f"{{source: {plays[1]}, weight: 1, name: b}}]",
                            # and the profiler on every rank: each writes its own trace, and says so
                            "profiler.enabled=true", "profiler.first_step=2", "profiler.steps=1", "profiler.ranks=all")
    assert sorted(p.name for p in (tmp_path / "profile" / "step_2").glob("*.gz")) == \
        ["rank0.trace.json.gz", "rank1.trace.json.gz"]
    assert "profiler: step 2 traced on rank 1" in result.stdout
    last = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r][-1]
    assert last["tokens_a"] + last["tokens_b"] == 6 * 4 * 32 * 2  # steps x batch x seq_len x ranks
    assert abs(last["tokens_a"] - last["tokens_b"]) <= 0.3 * (last["tokens_a"] + last["tokens_b"])


def run_nodes(commands, timeout=240, cwds=None):
    """Each command (a pretended node's torchrun agent) in a process of its own, at once
    (in the folders ``cwds``): their exit codes and outputs."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
             for c, cwd in zip(commands, cwds or [None] * len(commands))]
    try:
        logs = [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    return [node.returncode for node in nodes], logs


def test_two_nodes_sharing_a_cache_each_say_in_their_own_log_who_prepares(base_overrides, corpus_dir, tmp_path):
    """Two torchrun agents (--nnodes 2, one process each, as two hosts would start them) on
    one data.cache_dir: one node's first process prepares the corpus, the other's waits for
    it, and each says so in its own node's log (before: only global rank 0 logged, so node
    1 printed nothing while it prepared, or while it waited)."""
    from tests.launch import free_port

    overrides = [o for o in base_overrides if not o.startswith(("data.source=", "data.cache_dir="))]
    command = recipe_command("pretrain", "--config", "pretrain_tiny", *overrides, f"data.source={corpus_dir}",
                             f"data.cache_dir={tmp_path / 'shared_cache'}", f"output_dir={tmp_path / 'run'}",
                             "max_steps=1", "eval_every=0", nnodes=2, port=free_port())
    codes, logs = run_nodes([command, command])
    assert codes == [0, 0], logs
    rank_1 = next(log for log in logs if "[rank 1 on " in log)
    rank_0 = next(log for log in logs if log is not rank_1)
    said = [("prepare: done" in log) + ("waiting for" in log) for log in (rank_0, rank_1)]
    assert said == [1, 1], logs  # one prepared, the other waited, each in its own log
    assert ("prepare: done" in rank_1) == ("waiting for" in rank_0)


def test_the_rank_whose_loader_holds_the_others_back_is_named(base_overrides, tmp_path):
    """Rank 1's batches come 1 s late: rank 0, which logs, names rank 1 and its host, and
    metrics.jsonl keeps the slowest rank's share beside the mean. (With 0.2 s the share fell
    below one half once in a loaded CI run, whose steps took longer than the delay.)"""
    result = tune_run_2proc("pretrain", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path}", "max_steps=6",
                            "log_every=2", "eval_every=0", "debug.slow_batches_s=1.0", "debug.rank=1")
    said = [line for line in result.stdout.splitlines() if "waited for its batches" in line]
    assert len(said) == 1 and said[0].startswith("warning: input: rank 1 (on "), result.stdout
    logged = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "data_wait_time_share" in r][1:]
    assert all(r["data_wait_time_share_max"] > 0.5 and
               r["data_wait_time_share"] == pytest.approx(r["data_wait_time_share_max"] / 2, abs=0.05)
               for r in logged), [(r["data_wait_time_share"], r["data_wait_time_share_max"]) for r in logged]


def test_nodes_started_with_different_settings_are_named_before_any_step(base_overrides, tmp_path):
    """Two torchrun agents (--nnodes 2) whose commands differ in one override, as an sbatch
    script that reads a variable set on one node only would start them: before, each node
    trained its shard with its own learning rate, without a word. Now every process stops
    at setup with the key, both values and both hosts, and nothing is written."""
    from tests.launch import free_port

    port, out = free_port(), tmp_path / "run"
    codes, logs = run_nodes([recipe_command("pretrain", "--config", "pretrain_tiny", *base_overrides,
                                            f"output_dir={out}", "max_steps=1", "eval_every=0", f"optimizer.lr={lr}",
                                            nnodes=2, port=port) for lr in ("0.003", "0.001")])
    assert [code != 0 for code in codes] == [True, True], logs
    said = "error: the job's processes do not run the same thing: rank 1 (on "
    assert any(said in log for log in logs), logs
    assert any(") differs from rank 0 (on " in log and ": optimizer.lr=0.00" in log for log in logs), logs
    assert "step 1" not in "".join(logs) and not (out / "checkpoints").exists()


def _can_unshare_mounts() -> bool:
    import shutil

    return bool(shutil.which("unshare")) and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs unshare -m (root, or CAP_SYS_ADMIN) to give one pretended "
                                                      "node a disk of its own")
def test_an_output_dir_that_is_each_nodes_own_disk_is_named_before_any_step(base_overrides, tmp_path):
    """Two torchrun agents (--nnodes 2), the second in a mount namespace of its own with a
    fresh tmpfs over the output folder's parent: the same path, a different disk, as /tmp or
    /local/scratch is on two hosts. Before, each node wrote its ranks' part of every
    checkpoint to its own disk, and none was whole."""
    from tests.launch import free_port

    local = tmp_path / "node_local"
    local.mkdir()
    out = local / "run"
    command = recipe_command("pretrain", "--config", "pretrain_tiny", *base_overrides, f"output_dir={out}",
                             "max_steps=2", "save_every=1", "eval_every=0", nnodes=2, port=free_port())
    own_disk = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs "{local}" && exec "$0" "$@"', *command]
    codes, logs = run_nodes([command, own_disk])
    assert [code != 0 for code in codes] == [True, True], logs
    assert any(f"error: output_dir={str(out)!r} is not one folder for every process: 1 of the job's 2 ranks (rank "
               in log for log in logs), logs
    assert "step 1" not in "".join(logs) and not out.exists()  # rank 0's lock and probe taken back with the folder


@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs unshare -m (root, or CAP_SYS_ADMIN) to give one pretended "
                                                      "node a disk of its own")
def test_a_tokenizer_that_differs_on_one_nodes_own_disk_is_named_before_any_step(base_overrides, tokenizer_path,
                                                                                  tmp_path):
    """The same tokenizer.path on two nodes' own disks, one copy saved again with other
    formatting (the bytes differ): each node prepared and trained on its own tokens.
    Named after the data is prepared, before any step."""
    import json

    from tests.launch import free_port

    local, other = tmp_path / "node_local", tmp_path / "other.json"
    local.mkdir()
    (local / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
    other.write_text(json.dumps(json.loads(tokenizer_path.read_text(encoding="utf-8")), indent=1))
    overrides = [o for o in base_overrides if not o.startswith("tokenizer.path=")]
    command = recipe_command("pretrain", "--config", "pretrain_tiny", *overrides, f"tokenizer.path={local}/tokenizer.json",
                             f"output_dir={tmp_path / 'run'}", "max_steps=1", "eval_every=0", nnodes=2, port=free_port())
    own_disk = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs "{local}" && cp "{other}" "{local}/tokenizer.json" '
                '&& exec "$0" "$@"', *command]
    codes, logs = run_nodes([command, own_disk])
    assert [code != 0 for code in codes] == [True, True], logs
    assert any("differs from rank 0 (on " in log and ": tokenizer (tokenizer.path)='" in log for log in logs), logs
    assert "step 1" not in "".join(logs) and not (tmp_path / "run" / "checkpoints").exists()


def test_a_relative_output_dir_from_two_working_directories_is_named_as_that(base_overrides, tmp_path):
    """Nodes started from different folders (a job script's cd on one node) with a relative
    output_dir would write one run into two folders (and read other files under a relative
    data.source): named, with both folders."""
    from tests.launch import free_port

    command = recipe_command("pretrain", "--config", "pretrain_tiny", *base_overrides, "output_dir=run", "max_steps=1",
                             "eval_every=0", nnodes=2, port=free_port())
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
    codes, logs = run_nodes([command, command], cwds=folders)
    assert [code != 0 for code in codes] == [True, True], logs
    assert any("error: the job's processes do not run the same thing: rank 1 (on " in log and
               "working directory (of the relative output_dir)='" in log for log in logs), logs
    assert all(str(folder) in "".join(logs) for folder in folders)
    assert not any((folder / "run").exists() for folder in folders)


@pytest.fixture(scope="module")
def student_export(base_overrides, tmp_path_factory):
    """A finished run of the tiny student's own shape, exported in fp32 (init_from's source)."""
    from letrecipes import pretrain

    out = tmp_path_factory.mktemp("source")
    pretrain.recipe_main(["--config", "baseline_tiny", *base_overrides, f"output_dir={out}", "max_steps=2",
                          "eval_every=0", "export.dtype=fp32"])
    return out / "final"


def test_init_from_on_two_ranks_is_read_once_and_gives_every_shard_its_weights(base_overrides, student_export,
                                                                              tmp_path):
    from safetensors.torch import load_file

    result = tune_run_2proc("pretrain", "baseline_tiny", *base_overrides, f"output_dir={tmp_path}", "max_steps=1",
                            "eval_every=0", f"init_from={student_export}", "optimizer.lr=1e-12",
                            "optimizer.weight_decay=0", "export.dtype=fp32")
    assert "(read by rank 0, sent to all 2 ranks)" in result.stdout
    ours, theirs = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "final", student_export))
    assert ours.keys() == theirs.keys()
    for key in ours:  # one step at lr 1e-12 moves no weight by more than rounding
        assert torch_allclose(ours[key], theirs[key]), key


def torch_allclose(a, b):
    import torch

    return torch.allclose(a, b, rtol=0, atol=1e-6)


def test_a_damaged_init_from_stops_both_ranks_with_rank_0s_error(base_overrides, student_export, tmp_path):
    """Rank 0 alone reads the weights: its error must reach the other rank, which would
    otherwise wait for the broadcast until the group's timeout."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(student_export, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    done = tune_run_2proc("pretrain", "baseline_tiny", *base_overrides, f"output_dir={tmp_path / 'run'}",
                          "max_steps=1", f"init_from={damaged}", "process_group_timeout_s=120", timeout=100,
                          check=False)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    # printed once, by rank 0; each rank's line is in torchrun's summary (it used to be printed once per rank)
    assert len(errors) == 1, done.stderr[-3000:]
    assert "init_from" in errors[0] and "model.safetensors" in errors[0]
    launcher_summary(done.stderr, errors[0])  # the launcher's summary, grouped
    assert "new message format" not in done.stderr  # the error file is in torchrun's own layout
    assert "step 1/" not in done.stdout


def test_a_failed_multi_process_run_names_its_error_in_the_launchers_summary(base_overrides, tmp_path):
    """torchrun ends a failed job with a summary whose root cause said only `traceback : To
    enable traceback see: https://...`, below the ranks' own one-line errors: each rank now
    hands its line to the launcher's error file, and the summary, printed last, names it.
    That summary came after twenty lines of the launcher's own traceback and repeated each
    rank's error in a block of seven: now it is one line per distinct error, naming its ranks."""
    result = tune_run_2proc("pretrain", "pretrain_tiny", *base_overrides, "data.source=/nonexistent/corpus",
                            f"output_dir={tmp_path}", check=False, timeout=120, via_tune=True)
    assert result.returncode == 1
    summary = launcher_summary(result.stderr, "error: data.source: '/nonexistent/corpus' does not exist")
    assert summary[0].startswith("letrecipes.pretrain failed on 2 processes of this node (ranks 0-1, on "), summary
    for noise in ("To enable traceback see", "Traceback (most recent call last)", "Root Cause",
                  "no error file defined for parent"):
        assert noise not in result.stderr, result.stderr[-3000:]


def test_a_bug_in_a_multi_process_run_is_named_with_its_traceback_in_the_summary(base_overrides, tmp_path,
                                                                                 monkeypatch):
    """A failure that is no error of ours (here a user's learning-rate schedule raising on
    step 1) left the summary's root cause at `To enable traceback see: https://...`: the
    recipe now records it in the launcher's error file, traceback included."""
    (tmp_path / "exploding_schedule.py").write_text(
        "import torch\n"
        "from letrecipes.components.registry import register\n\n\n"
        "@register('lr_scheduler', 'exploding')\n"
        "def exploding(optimizer, **unused):\n"
        "    def factor(step):\n"
        "        if step >= 1:\n"
        "            raise RuntimeError('the schedule exploded at step 1')\n"
        "        return 1.0\n"
        "    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    result = tune_run_2proc("pretrain", "pretrain_tiny", *base_overrides, "imports=[exploding_schedule]",
                            "lr_scheduler._component_=exploding", "max_steps=2", "eval_every=0",
                            f"output_dir={tmp_path / 'run'}", check=False, timeout=120)
    assert result.returncode != 0
    summary = result.stderr[result.stderr.index("failed on 2 processes"):]
    # the rank's own traceback, whole, under the ranks that raised it (a bug is shown, not summarised away)
    assert re.search(r"  ranks? (0-1|0|1): \n    Traceback \(most recent call last\)", summary), summary
    assert "RuntimeError: the schedule exploded at step 1" in summary, summary
    assert "To enable traceback see" not in result.stderr


def test_a_data_warning_is_given_once_not_once_per_rank(base_overrides, corpus_dir, tmp_path):
    """Every rank reads the same corpus, and each repeated its warnings (a corpus holding a
    copy of a file: one warning per rank, 64 lines on 64 GPUs). Rank 0 gives them, once."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    play = sorted(corpus_dir.glob("*.txt"))[0]
    for name in ("play.txt", "play copy.txt"):
        (corpus / name).write_text(play.read_text(encoding="utf-8"))
    result = tune_run_2proc("pretrain", "pretrain_tiny", *base_overrides, f"data.source={corpus}",
                            f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}", "max_steps=1",
                            "eval_every=0", timeout=120)
    said = [line for line in (result.stdout + result.stderr).splitlines() if "are copies of another" in line]
    assert len(said) == 2, said  # the prepare's count in the log, and one warning
    assert sum(line.startswith("warning: data.source:") for line in said) == 1, said
