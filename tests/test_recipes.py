"""The two recipes, run in-process on a tiny model: contract, resume, teacher release, bad input."""

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from letrecipes.components.tokenizer import train_bpe
from letrecipes.components.metrics import read_metrics
from letrecipes.components.teachers import load_teacher
from letrecipes import let_pretrain, pretrain
from letrecipes._config import resolve_config_path

BASE_KEYS = {"step", "loss", "nll", "lr", "tokens_per_s", "grad_norm", "peak_memory_mb"}
LET_KEYS = BASE_KEYS | {"align_loss", "lambda", "cosine", "teacher_time_share"}


def run_pretrain(*args):
    pretrain.recipe_main(["--config", "pretrain_tiny", *args])


def run_let(*args):
    let_pretrain.recipe_main(["--config", "let_tiny", *args])


def steps(records):
    return [r for r in records if "loss" in r]


def test_pretrain_smoke_writes_the_metrics_contract_and_an_export(base_overrides, tmp_path):
    run_pretrain(*base_overrides, f"output_dir={tmp_path}", "max_steps=4", "save_every=2")
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in steps(records)] == [1, 2, 3, 4]
    assert all(BASE_KEYS <= r.keys() for r in steps(records))
    assert records[-1]["val_loss"] > 0 and records[0]["loss"] > records[-1]["loss"] - 1.0
    assert (tmp_path / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    assert sorted(load_file(str(tmp_path / "final" / "model.safetensors")))  # a real weight file
    assert (tmp_path / "final" / "tokenizer.json").is_file() and (tmp_path / "config.yaml").is_file()


def test_a_validation_split_smaller_than_a_batch_is_evaluated_whole_with_a_warning(base_overrides, tmp_path, capsys):
    """The split that a 7B config's val_fraction (or a small corpus's 0.02) leaves: fewer
    sequences than a batch. It used to stop the run before its first step ("data: 5 sequences
    cannot fill one batch of 16", read as the training data being short); it is evaluated
    whole, in smaller batches, with a warning that the figure is noisy. A split with no
    sequence for a process is one error naming the validation split and its fixes."""
    import warnings

    from letrecipes.components.data import DataError, PackedDataset, build_dataloader

    small_val = [*base_overrides, "data.val_fraction=0.0001", "batch_size=8", "max_steps=2"]
    run_pretrain(*small_val, f"output_dir={tmp_path / 'no_eval'}", "eval_every=0")
    assert [r["step"] for r in steps(read_metrics(tmp_path / "no_eval" / "metrics.jsonl"))] == [1, 2]
    assert "validation split" not in capsys.readouterr().err  # a run that never evaluates says nothing of it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_pretrain(*small_val, f"output_dir={tmp_path / 'eval'}", "eval_every=1")
    said = [str(w.message) for w in caught if "validation split" in str(w.message)]
    assert len(said) == 1 and "(data.val_fraction=0.0001) holds 1 sequence(s) of 32 tokens, fewer than a batch of 8" \
        in said[0] and "in batches of 1" in said[0] and "noisy" in said[0], said
    losses = [r["val_loss"] for r in read_metrics(tmp_path / "eval" / "metrics.jsonl") if "val_loss" in r]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)

    one = PackedDataset(list(range(100)), 32, "val", 0.4)
    with pytest.raises(DataError, match=r"^data: the validation split holds 1 sequence\(s\), too few for one batch of "
                                        r"1 on each of 2 process\(es\)\. Fix: a larger data.val_fraction, a held-out "
                                        r"corpus in data.val_source, or eval_every=0"):
        build_dataloader(one, 1, seed=0, world_size=2, what="the validation split")
    with pytest.raises(DataError, match=r"^data: the training split holds 2 sequence\(s\), too few for one batch of 4 "
                                        r"on each of 1 process\(es\)\. Fix: use more text"):
        build_dataloader(PackedDataset(list(range(100)), 32, "train", 0.4), 4, seed=0)


def test_val_fraction_zero_trains_on_every_sequence(base_overrides, tmp_path, capsys):
    """A run that never evaluates may give all its data to training."""
    import re

    import numpy as np

    from letrecipes.components.data import PackedDataset

    counts = {}
    for name, extra in (("all", ["data.val_fraction=0"]), ("split", [])):
        capsys.readouterr()
        run_pretrain(*base_overrides, f"output_dir={tmp_path / name}", "eval_every=0", "max_steps=1", *extra)
        counts[name] = int(re.search(r"; (\d+) training sequences", capsys.readouterr().out).group(1))
    windows = PackedDataset(np.zeros(10_000, dtype=np.uint16), 15, "train", 0.0)
    assert len(windows) == windows.windows == 625 and list(windows.index[:3]) == [0, 1, 2]
    assert counts["all"] > counts["split"]


def test_deterministic_runs_the_same_losses_and_hands_the_process_back(let_overrides, tmp_path):
    import torch

    short = [*let_overrides, "max_steps=3", "eval_every=0"]
    run_let(*short, f"output_dir={tmp_path / 'default'}")
    run_let(*short, f"output_dir={tmp_path / 'deterministic'}", "deterministic=true")
    losses = {name: [r["loss"] for r in steps(read_metrics(tmp_path / name / "metrics.jsonl"))]
              for name in ("default", "deterministic")}
    assert losses["default"] == losses["deterministic"] and len(losses["default"]) == 3
    # the switches are process-wide: restored
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_export_loads_back_as_a_frozen_teacher(teacher_dir):
    teacher = load_teacher({"path": str(teacher_dir), "dtype": "fp32"})
    assert teacher.depth == 2 and teacher.width == 24 and teacher.vocab_size == 512
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training
    import torch

    hidden = teacher.hidden_states(torch.randint(0, 512, (1, 8)), [2])
    assert hidden[2].shape == (1, 8, 24) and not hidden[2].requires_grad


def test_let_smoke_logs_alignment_and_releases_the_teacher(let_overrides, tmp_path):
    run_let(*let_overrides, f"output_dir={tmp_path}", "max_steps=8", "alignment.schedule.stop=4",
            "alignment.schedule._component_=linear", "alignment.schedule.lambda0=1.0")
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = steps(records)
    assert all(LET_KEYS <= r.keys() for r in train[:4])
    assert [r["lambda"] for r in train[:4]] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert all(-1.0 <= r["cosine"] <= 1.0 for r in train[:4])
    assert all(r["lambda"] == 0.0 and "align_loss" not in r for r in train[4:])
    released = [r for r in records if r.get("event") == "teacher_released"]
    assert len(released) == 1 and released[0]["step"] == 4 and released[0]["teacher_mb"] > 0


def test_memory_figures_where_there_is_no_proc_as_on_macos(let_overrides, tmp_path, monkeypatch, capsys):
    """Releasing the teacher read /proc/self/statm, which macOS has not: a LET run on a Mac
    laptop stopped at S_stop with FileNotFoundError. The resident size now comes from psutil
    there, and the release is logged without the figures where nothing tells them; the peak
    (ru_maxrss) is bytes on macOS, KiB on Linux."""
    import functools
    import resource
    import sys

    import torch

    from letrecipes.components import metrics

    cpu = torch.device("cpu")
    assert metrics.current_memory_mb(cpu, statm=str(tmp_path / "no-proc")) > 0  # psutil's figure
    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed: no figure, no error
    assert metrics.current_memory_mb(cpu, statm=str(tmp_path / "no-proc")) is None
    monkeypatch.setattr(let_pretrain, "current_memory_mb", functools.partial(metrics.current_memory_mb,
                                                                             statm=str(tmp_path / "no-proc")))
    run_let(*let_overrides, f"output_dir={tmp_path / 'run'}", "max_steps=3", "alignment.schedule.stop=2")
    said = [line for line in capsys.readouterr().out.splitlines() if "teacher released" in line]
    assert said and said[0].endswith("MiB of weights)"), said
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r.get("memory_before_mb", 0) for r in records if r.get("event") == "teacher_released"] == [None]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    monkeypatch.setattr(sys, "platform", "darwin")
    assert metrics.peak_memory_mb(cpu) == pytest.approx(peak / 2**20, rel=0.01)


def test_teacher_object_is_gone_after_s_stop(let_overrides, tmp_path):
    recipe = let_pretrain.LETPretrainRecipe(OmegaConf.merge(
        OmegaConf.load(resolve_config_path("let_tiny")),
        OmegaConf.from_dotlist([*let_overrides, f"output_dir={tmp_path}", "max_steps=3", "alignment.schedule.stop=2"]),
    ))
    recipe.setup()
    import weakref

    ref = weakref.ref(recipe.teacher)
    recipe.train()
    recipe.cleanup()
    assert recipe.teacher is None and ref() is None


@pytest.mark.parametrize("runner, extra", [
    (run_pretrain, []),
    (run_pretrain, ["async_checkpoint=true"]),
    (run_let, ["alignment.schedule.stop=6"]),
], ids=["pretrain", "pretrain-async-save", "let"])
def test_resume_continues_exactly(runner, extra, request, tmp_path):
    overrides = request.getfixturevalue("let_overrides" if runner is run_let else "base_overrides")
    straight, split = tmp_path / "straight", tmp_path / "split"
    runner(*overrides, *extra, f"output_dir={straight}", "max_steps=8")
    runner(*overrides, *extra, f"output_dir={split}", "max_steps=8", "save_every=4")
    # simulate a crash after the step-4 checkpoint: drop the later checkpoint and export

    shutil.rmtree(split / "checkpoints" / "step_00000008")
    shutil.rmtree(split / "final")
    runner(*overrides, *extra, f"output_dir={split}", "max_steps=8", "save_every=4", "resume=true")
    a, b = steps(read_metrics(straight / "metrics.jsonl")), steps(read_metrics(split / "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(1, 9))
    for key in ("loss", "nll", "lr", "val_loss", "tokens") + (("align_loss", "lambda", "cosine") if runner is run_let
                                                              else ()):
        logged_a = [(r["step"], r[key]) for r in a if r.get(key) is not None]
        logged_b = [(r["step"], r[key]) for r in b if r.get(key) is not None]
        assert logged_a, key
        assert [s for s, _ in logged_a] == [s for s, _ in logged_b], key
        assert [v for _, v in logged_a] == pytest.approx([v for _, v in logged_b], rel=1e-5, abs=1e-6), key


def test_time_spent_waiting_for_batches_is_logged_and_a_loader_that_cannot_keep_up_is_said_once(base_overrides,
                                                                                                    tmp_path, capsys):
    """torchtitan logs its data-loading share; ours had none, so a slow loader (a slow disk,
    too few workers) looked like a slow model. Each record now carries the share of the
    interval spent in the loader (host time; mean over ranks and the largest)."""
    run_pretrain(*base_overrides, f"output_dir={tmp_path / 'quick'}", "max_steps=4", "log_every=2", "eval_every=0")
    logged = [r for r in read_metrics(tmp_path / "quick" / "metrics.jsonl") if "data_wait_time_share" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert all(0 <= r["data_wait_time_share"] == r["data_wait_time_share_max"] < 1 for r in logged), logged
    capsys.readouterr()
    run_pretrain(*base_overrides, f"output_dir={tmp_path / 'slow'}", "max_steps=6", "log_every=2", "eval_every=0",
                 "debug.slow_batches_s=0.2")
    said = [line for line in capsys.readouterr().out.splitlines() if "waited for its batches" in line]
    assert len(said) == 1 and said[0].startswith("warning: input: this process waited for its batches "), said
    assert "Fix: more loader processes (data.num_workers=2; now 0)" in said[0]
    slow = [r for r in read_metrics(tmp_path / "slow" / "metrics.jsonl") if "data_wait_time_share" in r]
    assert all(r["data_wait_time_share"] > 0.5 for r in slow[1:]), slow  # 0.2 s a batch against a step of ms
    # not a ratio: on a loaded machine the quick run's share reached 0.30 (its loader's host time grows with the load)
    assert slow[-1]["data_wait_time_share"] > logged[-1]["data_wait_time_share"]


def test_model_flops_per_second_and_mfu_are_logged_against_the_devices_peak(base_overrides, tmp_path, capsys):
    """torchtitan's log line carries MFU; ours had it only in benchmarks/gpu_check.py. Every
    record now has tflops_per_s (the student's model FLOPs per process), and mfu where the
    peak is known: a GPU's bf16 peak by its name, or metrics.peak_tflops (here a CPU's)."""
    from letrecipes.components.estimate import forward_flops_per_token, peak_bf16_tflops
    from letrecipes.components.models import ModelArgs

    run_pretrain(*base_overrides, f"output_dir={tmp_path}", "max_steps=4", "log_every=2", "eval_every=0",
                 "metrics.peak_tflops=0.5")
    config = json.loads((tmp_path / "final" / "config.json").read_text(encoding="utf-8"))
    args = ModelArgs(num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                     num_kv_heads=config["num_key_value_heads"], embed_dim=config["hidden_size"],
                     intermediate_dim=config["intermediate_size"], vocab_size=config["vocab_size"],
                     max_seq_len=config["max_position_embeddings"], tie_word_embeddings=config["tie_word_embeddings"])
    per_token = 3 * forward_flops_per_token(args, 32)  # data.seq_len=32 in base_overrides
    logged = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "tflops_per_s" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for r in logged:
        assert r["tflops_per_s"] == pytest.approx(r["tokens_per_s"] * per_token / 1e12, rel=1e-6)
        assert r["mfu"] == pytest.approx(r["tflops_per_s"] / 0.5, rel=1e-6)
    assert " | mfu " in capsys.readouterr().out
    run_pretrain(*base_overrides, f"output_dir={tmp_path / 'cpu'}", "max_steps=2", "eval_every=0")
    assert all("mfu" not in r for r in read_metrics(tmp_path / "cpu" / "metrics.jsonl"))  # no peak known for a CPU
    assert [peak_bf16_tflops(name) for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200",
                                                "NVIDIA A100-SXM4-80GB", "NVIDIA L40S", "NVIDIA L4", "Tesla V100")] \
        == [989.0, 756.0, 989.0, 312.0, 362.0, 121.0, None]


def test_a_wsd_run_extended_in_its_stable_phase_goes_on_at_the_same_rate(base_overrides, tmp_path, capsys):
    """The reason to offer warmup_stable_decay: a run resumed with a larger max_steps before its
    decay goes on at the rate it had and decays at its new end, where the cosine's longer
    horizon moves the rate (said as "resume: the learning rate for step 5 is ...")."""
    wsd = ["lr_scheduler._component_=warmup_stable_decay", "lr_scheduler.decay_fraction=0.25",
           "lr_scheduler.min_lr_ratio=0", "optimizer.lr=0.001", "eval_every=0", "save_every=4"]
    run_pretrain(*base_overrides, *wsd, f"output_dir={tmp_path}", "max_steps=8")
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000008")
    shutil.rmtree(tmp_path / "final")
    capsys.readouterr()
    run_pretrain(*base_overrides, *wsd, f"output_dir={tmp_path}", "max_steps=16", "resume=true")
    assert "resume: the learning rate for step" not in capsys.readouterr().out
    rates = {r["step"]: r["lr"] for r in steps(read_metrics(tmp_path / "metrics.jsonl"))}
    assert rates[4] == rates[5] == rates[12] == pytest.approx(0.001)  # warmup_steps=2 (base_overrides), then flat
    assert rates[13] == pytest.approx(0.001) and rates[16] == pytest.approx(0.001 * 0.25)  # the new end's decay


def test_trained_tokens_are_counted_across_a_resume_with_another_batch(base_overrides, tmp_path):
    from letrecipes.components.checkpointing import Progress

    run_pretrain(*base_overrides, f"output_dir={tmp_path}", "max_steps=4", "save_every=4", "batch_size=4")
    shutil.rmtree(tmp_path / "final")
    run_pretrain(*base_overrides, f"output_dir={tmp_path}", "max_steps=6", "save_every=4", "batch_size=8",
                 "resume=true")
    tokens = {r["step"]: r["tokens"] for r in steps(read_metrics(tmp_path / "metrics.jsonl"))}
    assert tokens[4] == 4 * 4 * 32 and tokens[6] == 4 * 4 * 32 + 2 * 8 * 32  # steps x batch x seq_len, per launch
    saved = json.loads((tmp_path / "checkpoints" / "step_00000006" / "run_info.json").read_text(encoding="utf-8"))
    assert saved["trained_tokens"] == tokens[6]
    progress = Progress()  # a checkpoint saved before tokens were counted: None, for the recipe to estimate
    progress.load_state_dict({"step": 3, "train_time": 1.5})
    assert (progress.step, progress.tokens) == (3, None)


def test_resume_true_without_checkpoint_starts_fresh(base_overrides, tmp_path):
    run_pretrain(*base_overrides, f"output_dir={tmp_path}", "max_steps=2", "resume=true")
    assert len(steps(read_metrics(tmp_path / "metrics.jsonl"))) == 2


def expect_setup_error(runner, *args, match):
    with pytest.raises(SystemExit) as err:
        runner(*args)
    message = str(err.value.code)
    assert message.startswith("error: ") and match in message, message
    return message


def test_existing_output_dir_is_never_overwritten_silently(base_overrides, tmp_path):
    run_pretrain(*base_overrides, f"output_dir={tmp_path}", "max_steps=2")
    before = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8")
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path}", "max_steps=2",
                       match="already holds a run")
    assert (tmp_path / "metrics.jsonl").read_text(encoding="utf-8") == before
    run_pretrain(*base_overrides, f"output_dir={tmp_path}", "max_steps=3", "overwrite=true")
    assert len(steps(read_metrics(tmp_path / "metrics.jsonl"))) == 3


def test_unknown_component_name(let_overrides, tmp_path):
    message = expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path}", "alignment.loss=cosine_typo",
                                 match="alignment.loss._component_: unknown alignment_loss 'cosine_typo'")
    assert "negative_cosine" in message
    assert not tmp_path.joinpath("metrics.jsonl").exists()


def test_layer_index_outside_the_model(let_overrides, tmp_path):
    config = OmegaConf.load(resolve_config_path("let_tiny"))
    config.alignment.layer_map = {"_component_": "pairs", "pairs": [[9, -1]]}
    path = tmp_path / "bad.yaml"
    OmegaConf.save(config, path)
    with pytest.raises(SystemExit) as err:
        let_pretrain.recipe_main(["--config", str(path), *let_overrides, f"output_dir={tmp_path / 'run'}"])
    assert "student layer 9 is outside the student's depth: it has 4 blocks" in str(err.value.code)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_teacher_trained_with_another_tokenizer(let_overrides, corpus_dir, tmp_path):
    other = train_bpe([p.read_text(encoding="utf-8") for p in corpus_dir.glob("*.txt")], 400, tmp_path / "other.json")
    # (auto, the default, would align across the two tokenizers: tests/test_cross_tokenizer.py)
    expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path / 'run'}", f"tokenizer.path={other}",
                       "alignment.cross_tokenizer=false", match="differs from the teacher's own tokenizer")


def test_teacher_vocabulary_smaller_than_the_tokenizer(let_overrides, corpus_dir, tmp_path):
    bigger = train_bpe([p.read_text(encoding="utf-8") for p in corpus_dir.glob("*.txt")], 1024, tmp_path / "big.json")
    expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path / 'run'}", f"tokenizer.path={bigger}",
                       "alignment.cross_tokenizer=false", match="teacher's vocabulary (512) is smaller than the tokenizer's (1024")


def test_missing_teacher_checkpoint(let_overrides, tmp_path):
    expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path}", f"teacher.path={tmp_path / 'none'}",
                       match="teacher.path: nothing at")


def test_unreadable_teacher_checkpoint(let_overrides, teacher_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((teacher_dir / "config.json").read_text(encoding="utf-8"))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path / 'run'}", f"teacher.path={broken}",
                       match="teacher.path: cannot read")
    (broken / "config.json").write_text(json.dumps({"model": {"nonsense": 1}}))
    expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path / 'run'}", f"teacher.path={broken}",
                       match="is not a letrecipes model config")


def test_missing_corpus(base_overrides, tmp_path):
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path}", "data.source=/no/such/corpus",
                       match="data.source: '/no/such/corpus' does not exist")


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(SystemExit) as err:
        pretrain.recipe_main(["--config", "no_such_config"])
    assert "pretrain_tiny" in str(err.value.code) and "let_tiny" in str(err.value.code)


def test_gradient_accumulation_sees_more_tokens_per_step(base_overrides, tmp_path):
    run_pretrain(*base_overrides, f"output_dir={tmp_path}", "max_steps=2", "gradient_accumulation_steps=2")
    records = steps(read_metrics(tmp_path / "metrics.jsonl"))
    assert len(records) == 2 and Path(tmp_path / "final" / "model.safetensors").is_file()


def test_resume_from_a_path_that_is_not_a_checkpoint(base_overrides, tmp_path):
    (tmp_path / "half_written").mkdir()
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'run'}",
                       f"resume={tmp_path / 'half_written'}", match="is not a complete checkpoint")
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'run'}",
                       f"resume={tmp_path / 'missing'}", match="no such checkpoint folder")
    # a finished run's folder and its export: the key that was meant is named
    done = tmp_path / "done"
    run_pretrain(*base_overrides, f"output_dir={done}", "max_steps=2", "save_every=2")
    message = expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'run'}", f"resume={done}",
                                 match=f"is a training run's folder, not a checkpoint. Fix: resume=true with "
                                       f"output_dir={done}")
    assert message.endswith(f"or resume={done / 'checkpoints' / 'step_00000002'}.")
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'run'}", f"resume={done / 'final'}",
                       match=f"is an exported model (weights only: no optimizer state, schedule or data position), "
                             f"which a run cannot resume. Fix: init_from={done / 'final'} starts a new run")
    assert not (tmp_path / "run").exists()


def test_resume_skips_a_checkpoint_whose_save_never_finished(base_overrides, tmp_path):
    run_pretrain(*base_overrides, f"output_dir={tmp_path}", "max_steps=4", "save_every=2")
    # a save killed half-way leaves only a .tmp folder: resume must ignore it
    (tmp_path / "checkpoints" / "step_00000006.tmp").mkdir()
    run_pretrain(*base_overrides, f"output_dir={tmp_path}", "max_steps=6", "save_every=2", "resume=true")
    records = steps(read_metrics(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "checkpoints" / "step_00000006.tmp").exists()


def test_cuda_requested_without_a_gpu(base_overrides, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path}", "device=cuda",
                       match="device=cuda but torch sees no CUDA device")


def test_wandb_offline_needs_no_network_or_key(base_overrides, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_pretrain(*base_overrides, f"output_dir={tmp_path / 'old'}", "max_steps=2", "metrics.wandb.enabled=true",
                 "metrics.wandb.mode=offline")  # the older keys still work, and say what replaces them
    assert list((tmp_path / "old" / "wandb").glob("offline-run-*")), "no offline wandb run was written"
    assert "metric_logger: {_component_: torchtune.training.metric_logging.WandBLogger" in capsys.readouterr().out
    run_pretrain(*base_overrides, f"output_dir={tmp_path / 'new'}", "max_steps=2", "metric_logger={_component_: "
                 "torchtune.training.metric_logging.WandBLogger, project: letrecipes, mode: offline}")
    assert list((tmp_path / "new" / "wandb").glob("offline-run-*")), "no offline wandb run was written"


def test_resume_after_s_stop_neither_loads_nor_needs_the_teacher(let_overrides, teacher_dir, tmp_path, capsys):
    """Past S_stop the teacher guides nothing: a resume from there does not read it (a node
    without its files resumes; the aligner's saved state is rebuilt from the shape in the
    checkpoint's run_info.json) and goes on exactly as the run that was not stopped."""
    teacher, run = tmp_path / "teacher", tmp_path / "run"
    shutil.copytree(teacher_dir, teacher)
    common = [*let_overrides, f"output_dir={run}", "max_steps=6", "save_every=4", "alignment.schedule.stop=2",
              f"teacher.path={teacher}"]
    run_let(*common)
    straight = [r["loss"] for r in steps(read_metrics(run / "metrics.jsonl"))]
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    shutil.rmtree(teacher)
    capsys.readouterr()
    run_let(*common, "resume=true")
    assert "step_00000004 is past S_stop; the teacher is not loaded" in capsys.readouterr().out
    records = read_metrics(run / "metrics.jsonl")
    assert [r["loss"] for r in steps(records)] == straight
    after = [r for r in steps(records) if r["step"] > 4]
    assert after and all("teacher_time_share" not in r and r["lambda"] == 0.0 for r in after)
    assert [r["step"] for r in records if r.get("event") == "teacher_released"] == [2]  # the first launch's


def test_a_resume_that_moves_s_stop_is_logged_and_one_that_brings_a_released_teacher_back_is_refused(
        let_overrides, tmp_path, capsys):
    """``alignment.schedule.stop`` is a fraction of max_steps: raising max_steps on resume
    moved S_stop, and past a released teacher brought it back mid-run with only
    ``resume: max_steps 4 -> 12`` said. Now that is refused before anything is written,
    naming the stop that keeps the end; that fix resumes without the teacher's files; a
    resume before S_stop moves it and says so, with the new learning rate."""
    run = tmp_path / "run"
    common = [*let_overrides, f"output_dir={run}", "save_every=2", "lr_scheduler.warmup_steps=1"]
    run_let(*common, "max_steps=4", "alignment.schedule.stop=0.5")  # released at step 2
    capsys.readouterr()
    written = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(SystemExit) as err:
        run_let(*common, "max_steps=12", "alignment.schedule.stop=0.5", "resume=true")
    assert ("resume: step_00000004 is at step 4, past the alignment's end at step 2 (alignment.schedule.stop=0.5 of "
            "max_steps=4), where the teacher was released; this config ends it at step 6 (alignment.schedule.stop=0.5 "
            "of max_steps=12), so the teacher would guide steps after 4 again. Fix: alignment.schedule.stop=2 "
            "(a number of steps) keeps the end where it was") in str(err.value) + capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == written
    run_let(*common, "max_steps=6", "alignment.schedule.stop=2", "resume=true", "teacher.path=/nonexistent/teacher")
    out = capsys.readouterr().out
    assert "step_00000004 is past S_stop; the teacher is not loaded" in out
    assert "resume: the learning rate for step 5 is " in out
    assert all(r["lambda"] == 0.0 for r in steps(read_metrics(run / "metrics.jsonl")) if r["step"] > 4)
    # rolled back to step 4, the last, with a new rate: no step is left to train, so no rate is announced for one
    run_let(*common, "max_steps=4", "alignment.schedule.stop=2", f"resume={run}/checkpoints/step_00000004",
            "teacher.path=/nonexistent/teacher", "optimizer.lr=0.1")
    out = capsys.readouterr().out
    assert "resume: optimizer.lr " in out and "the learning rate for step" not in out, out
    # before S_stop: a longer run moves it, and the teacher guides on to the new end
    early = tmp_path / "early"
    run_let(*let_overrides, f"output_dir={early}", "save_every=2", "max_steps=4", "alignment.schedule.stop=0.75")
    shutil.rmtree(early / "checkpoints" / "step_00000004")
    capsys.readouterr()
    run_let(*let_overrides, f"output_dir={early}", "save_every=2", "max_steps=8", "alignment.schedule.stop=0.75",
            "resume=true")
    assert ("resume: the alignment's end (S_stop) moves from step 3 (alignment.schedule.stop=0.75 of max_steps=4) to "
            "step 6 (alignment.schedule.stop=0.75 of max_steps=8)") in capsys.readouterr().out
    released = [r["step"] for r in read_metrics(early / "metrics.jsonl") if r.get("event") == "teacher_released"]
    assert released[-1] == 6


def test_a_checkpoint_resumed_by_the_other_recipe_is_named_as_such(base_overrides, let_overrides, tmp_path):
    """A LET checkpoint resumed by plain pretraining (or the reverse) is one line about the
    recipe, with export + init_from as the way on; not a list of teacher keys."""
    run_let(*let_overrides, f"output_dir={tmp_path / 'let'}", "max_steps=2", "save_every=2")
    run_pretrain(*base_overrides, f"output_dir={tmp_path / 'plain'}", "max_steps=2", "save_every=2")
    message = expect_setup_error(run_pretrain, *base_overrides, f"output_dir={tmp_path / 'let'}", "max_steps=4",
                                 "resume=true", match="was written by a LET run (it has a teacher and an aligner), "
                                                      "and this run has none (plain pretraining)")
    assert "tune run letrecipes/let_pretrain" in message and "init_from=<folder>" in message
    message = expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path / 'plain'}", "max_steps=4",
                                 "resume=true", match="was written by plain pretraining (it has no teacher), and "
                                                      "this run is LET")
    assert "letrecipes export " in message and "alignment." not in message
    # plain pretraining on a LET config (its teacher section unused) is still plain pretraining
    run_pretrain(*base_overrides, "--config", "let_tiny", f"output_dir={tmp_path / 'on_let_config'}", "max_steps=2",
                 "save_every=2")
    expect_setup_error(run_let, *let_overrides, f"output_dir={tmp_path / 'on_let_config'}", "max_steps=4",
                       "resume=true", match="was written by plain pretraining")


def test_resume_from_an_explicit_checkpoint_path(base_overrides, tmp_path):
    run_pretrain(*base_overrides, f"output_dir={tmp_path / 'a'}", "max_steps=4", "save_every=2")
    checkpoint = tmp_path / "a" / "checkpoints" / "step_00000002"
    run_pretrain(*base_overrides, f"output_dir={tmp_path / 'b'}", "max_steps=4", f"resume={checkpoint}")
    a, b = steps(read_metrics(tmp_path / "a" / "metrics.jsonl")), steps(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    assert [r["step"] for r in b] == [3, 4]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a[2:]], rel=1e-5)


def test_cpu_malloc_tuning_is_reported_and_can_be_turned_off(base_overrides, tmp_path, capsys):
    run_pretrain(*base_overrides, f"output_dir={tmp_path / 'on'}", "max_steps=1")
    assert "malloc keeps freed memory" in capsys.readouterr().out
    run_pretrain(*base_overrides, f"output_dir={tmp_path / 'off'}", "max_steps=1", "cpu_malloc_tuning=false")
    assert "malloc keeps freed memory" not in capsys.readouterr().out


def test_a_log_redirected_to_a_file_says_elapsed_time_average_throughput_and_eta(base_overrides, tmp_path):
    import os
    import re
    import subprocess
    import sys

    log = tmp_path / "job.log"
    with open(log, "w") as out:  # not a terminal: no progress bar, as in a cluster job
        subprocess.run([sys.executable, "-m", "torchtune._cli.tune", "run", "letrecipes/pretrain", "--config",
                        "baseline_tiny", *base_overrides, f"output_dir={tmp_path / 'run'}", "max_steps=6", "log_every=2"],
                       stdout=out, stderr=subprocess.STDOUT, check=True, timeout=300, cwd=Path(__file__).parents[1],
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.startswith("step ")]
    assert len(lines) == 3 and all(re.search(r"\| elapsed \d+s", line) for line in lines)
    assert all(re.search(r"\| tokens_per_s_avg \d+ \| elapsed \S+ \| eta \d+s", line) for line in lines[1:])
    assert lines[-1].endswith("| eta 0s")
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert records[-1]["eta_s"] == 0 and records[0]["elapsed_s"] > 0


def test_a_torchtune_metric_logger_in_the_yaml_receives_the_let_metrics(let_overrides, tmp_path):
    logs = tmp_path / "disk_logs"
    let_pretrain.recipe_main(["--config", "let_tiny", *let_overrides, f"output_dir={tmp_path / 'run'}", "max_steps=3",
                              "metric_logger={_component_: torchtune.training.metric_logging.DiskLogger, "
                              f"log_dir: {logs}, filename: metrics.txt}}"])
    lines = [line for line in (logs / "metrics.txt").read_text(encoding="utf-8").splitlines() if " loss:" in line]
    assert len(lines) == 3 and lines[0].startswith("Step 1 | ")  # (events, such as the teacher's release, too)
    assert all(f" {key}:" in " " + lines[0] for key in ("loss", "nll", "align_loss", "lambda", "cosine"))
    assert len([r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]) == 3  # still written



def test_resume_notices_a_teacher_retrained_in_place_until_s_stop(let_overrides, teacher_dir, tmp_path, capsys):
    """The teacher's files are fingerprinted (run_info.json) like the tokenizer and the data:
    the same teacher at another path resumes; one retrained at its path is refused while it
    still guides the run; from S_stop on, where it guides nothing, it is not read, and its record goes on."""
    from safetensors.torch import save_file

    teacher, moved = tmp_path / "teacher", tmp_path / "moved"
    shutil.copytree(teacher_dir, teacher)
    shutil.copytree(teacher_dir, moved)
    run = tmp_path / "run"
    common = [*let_overrides, f"output_dir={run}", "max_steps=6", "save_every=2", "keep_last_checkpoints=3",
              "eval_every=0", "alignment.schedule._component_=linear", "alignment.schedule.stop=4"]
    run_let(*common, f"teacher.path={teacher}")
    checkpoints = run / "checkpoints"
    run_let(*common, f"teacher.path={moved}", f"resume={checkpoints / 'step_00000002'}")
    assert 'resume: teacher.path "' in capsys.readouterr().out
    weights = teacher / "model.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    before = (checkpoints / "step_00000002" / "run_info.json").read_bytes()
    expect_setup_error(run_let, *common, f"teacher.path={teacher}", f"resume={checkpoints / 'step_00000002'}",
                       match="was written by a different run: teacher fingerprint ")
    assert (checkpoints / "step_00000002" / "run_info.json").read_bytes() == before
    capsys.readouterr()
    run_let(*common, f"teacher.path={teacher}", f"resume={checkpoints / 'step_00000004'}")
    # from S_stop the teacher's files are not read: the checkpoints go on naming the teacher that guided the run
    # (before 2026-12-05 its record became null, logged as a change whether the teacher had changed or not)
    assert "teacher fingerprint" not in capsys.readouterr().out
    fingerprints = {json.loads((checkpoints / step / "run_info.json").read_text())["teacher_fingerprint"]
                    for step in ("step_00000002", "step_00000004", "step_00000006")}
    assert len(fingerprints) == 1 and None not in fingerprints


def _device_reads(recipe) -> list:
    """Train ``recipe`` and list each read of a tensor's value by the host, as (where, how):
    where is "step" inside a training step, else the step just finished. On a GPU each is a
    sync that stalls the queue of kernels. Caught as the ops and methods that read values:
    ``.item()``, ``bool()``/``float()``/``int()``, ``.tolist()``, ``.numpy()``, and the ops whose
    result's shape depends on the values (``nonzero``, ``masked_select``, ``equal``). The batches'
    loading (host data) and torch.optim's step counters (kept on the host by torch) are left out."""
    import traceback

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    value_ops = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                 aten.equal.default, aten.is_nonzero.default}
    reads, where = [], [None]

    def read(how: str) -> None:
        stack = traceback.extract_stack()
        if where[0] is not None and not any("torch/optim/" in f.filename for f in stack):
            ours = [f for f in stack if "/torch/" not in f.filename and f.filename != __file__]
            reads.append((where[0], how, f"{Path(ours[-1].filename).name}:{ours[-1].name}" if ours else "?"))

    class ValueReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in value_ops:
                read(str(func))
            return func(*args, **(kwargs or {}))

    step, next_batch = recipe.train_step, recipe.batches.next

    def counted_step():
        where[0] = "step"
        try:
            return step()
        finally:
            where[0] = recipe.step

    def loading():
        before, where[0] = where[0], None
        try:
            return next_batch()
        finally:
            where[0] = before

    recipe.train_step, recipe.batches.next = counted_step, loading
    methods = ("tolist", "numpy", "item", "__bool__", "__float__", "__int__")
    originals = {name: getattr(torch.Tensor, name) for name in methods}

    def watched(name):
        def method(self, *args, **kwargs):
            read(name)
            return originals[name](self, *args, **kwargs)
        return method

    try:
        for name in methods:
            setattr(torch.Tensor, name, watched(name))
        with ValueReads():
            recipe.train()
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
    recipe.cleanup()
    return reads


@pytest.mark.parametrize("recipe_class, config, extra", [(pretrain.PretrainRecipe, "pretrain_tiny", []),
                                                         (let_pretrain.LETPretrainRecipe, "let_tiny", []),
                                                         (let_pretrain.LETPretrainRecipe, "let_tiny",
                                                          ["fsdp.enabled=true"])],
                         ids=["pretrain", "let", "let-fsdp2"])
def test_the_host_reads_values_only_at_log_steps(recipe_class, config, extra, request, tmp_path):
    """Issue 14 (5), measured on a CPU by what the host reads: nothing inside a step (the loss,
    the gradient norm, LET's lambda from `schedule: auto`, the teacher's finiteness, all stay on
    the device) and one read each of the queued finiteness flags and the record at a log step,
    with gradient accumulation, clipping and the teacher's release (step 8) in the window, in
    one process and under FSDP2 (at world size 1, as the GPU check runs it)."""
    overrides = request.getfixturevalue("let_overrides" if config == "let_tiny" else "base_overrides")
    recipe = recipe_class(OmegaConf.merge(OmegaConf.load(resolve_config_path(config)), OmegaConf.from_dotlist([
        *overrides, f"output_dir={tmp_path}", "max_steps=12", "log_every=5", "eval_every=0", "save_every=0",
        "gradient_accumulation_steps=2", "clip_grad_norm=1.0", *extra,
        *(["alignment.schedule.stop=8"] if config == "let_tiny" else [])])))
    recipe.setup()
    reads = _device_reads(recipe)
    assert [r for r in reads if r[0] == "step"] == []
    assert sorted({r[0] for r in reads}) == [5, 10, 12], reads  # the log steps, and the last
    # two reads a log step: the queued finiteness flags, then the record (the last step also saves and exports)
    assert [(r[0], r[2]) for r in reads if r[0] in (5, 10)] == [
        (step, where) for step in (5, 10) for where in ("pretrain.py:resolve", "metrics.py:to_python")], reads


def _with_lr_scheduler(tmp_path, schedule) -> Path:
    config = OmegaConf.load(resolve_config_path("pretrain_tiny"))
    config.lr_scheduler = schedule
    path = tmp_path / f"{schedule['_component_'].rsplit('.', 1)[-1]}.yaml"
    OmegaConf.save(config, path)
    return path


def test_torch_and_torchtune_lr_schedulers_take_the_run_length_under_their_own_name(base_overrides, tmp_path, capsys):
    """Every schedule was given total_steps: torch's StepLR or torchtune's cosine with warmup
    ended in "got an unexpected keyword argument 'total_steps'", which no config key removes."""
    overrides = [o for o in base_overrides if not o.startswith("lr_scheduler.")] + ["optimizer.lr=0.004", "save_every=2"]

    def lrs(out):
        return [r["lr"] for r in steps(read_metrics(out / "metrics.jsonl"))]

    step_lr = _with_lr_scheduler(tmp_path, {"_component_": "torch.optim.lr_scheduler.StepLR", "step_size": 2,
                                            "gamma": 0.5})
    pretrain.recipe_main(["--config", str(step_lr), *overrides, f"output_dir={tmp_path / 'step'}", "max_steps=4"])
    assert lrs(tmp_path / "step") == pytest.approx([0.004, 0.004, 0.002, 0.002])
    # resumed with a new rate: the step goes on from torch's closed form on the new base, and says so
    pretrain.recipe_main(["--config", str(step_lr), *overrides, f"output_dir={tmp_path / 'step'}", "max_steps=6",
                          "resume=true", "optimizer.lr=0.001"])
    assert lrs(tmp_path / "step")[4:] == pytest.approx([0.00025, 0.00025])  # 0.001 x 0.5 ** (step // 2)
    assert "resume: the learning rate for step 5 is 0.00025 on this config's schedule" in capsys.readouterr().out

    # torchtune's takes the length as num_training_steps: warmup over 1 step, then a cosine over the other 3
    cosine = _with_lr_scheduler(tmp_path, {"_component_": "torchtune.training.lr_schedulers."
                                                          "get_cosine_schedule_with_warmup", "num_warmup_steps": 1})
    pretrain.recipe_main(["--config", str(cosine), *overrides, f"output_dir={tmp_path / 'cosine'}", "max_steps=4"])
    assert lrs(tmp_path / "cosine") == pytest.approx([0.0, 0.004, 0.003, 0.001])

    # OneCycleLR keeps its length in its state: a resume to a later max_steps is one line, not torch's error there
    one_cycle = _with_lr_scheduler(tmp_path, {"_component_": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": 0.01})
    pretrain.recipe_main(["--config", str(one_cycle), *overrides, f"output_dir={tmp_path / 'cycle'}", "max_steps=4"])
    expect_setup_error(pretrain.recipe_main, ["--config", str(one_cycle), *overrides, "resume=true", "max_steps=6",
                                              f"output_dir={tmp_path / 'cycle'}"],
                       match="resume: lr_scheduler (OneCycleLR) keeps its length in the checkpoint, total_steps=4, "
                             "and this resume trains to max_steps=6. Fix: max_steps=4")


def test_dtype_auto_computes_in_fp32_where_bf16_is_slow_and_a_resume_elsewhere_says_what_changed(
        let_overrides, tmp_path, monkeypatch, capsys):
    """A CPU without bf16 instructions (AVX2 alone) ran pretrain_tiny's step 14x slower in bf16
    than in fp32 (533 against 7,400 tokens/s, 2026-12-08), and the CPU configs said bf16. With
    ``auto`` the recipe takes fp32 there, for the student and the teacher, in one line with the
    reason; a resume on a device where bf16 is fast goes on in bf16 and says so."""
    from letrecipes.components import parallel

    out = tmp_path / "run"
    args = [*let_overrides, "dtype=auto", "teacher.dtype=auto", f"output_dir={out}", "save_every=2", "eval_every=0"]
    monkeypatch.setattr(parallel, "cpu_bf16_slowdown", lambda: 61.0)
    run_let(*args, "max_steps=2")
    said = capsys.readouterr().out
    assert "dtype=auto, teacher.dtype=auto: fp32, since bf16 would run on this CPU (" in said
    assert "a bf16 matmul took 61x an fp32 one" in said and "compute fp32" in said
    assert json.loads((out / "run_info.json").read_text(encoding="utf-8"))["dtypes"] == {
        "dtype": "fp32", "teacher.dtype": "fp32"}

    monkeypatch.setattr(parallel, "cpu_bf16_slowdown", lambda: 0.8)
    run_let(*args, "max_steps=4", "resume=true")
    said = capsys.readouterr().out
    assert "dtype=auto, teacher.dtype=auto: bf16, which this device computes at speed" in said
    assert "compute bf16" in said
    assert "resume: dtype=auto computes in bf16 on this device; the run computed in fp32 until step 2" in said
    assert "resume: teacher.dtype=auto computes in bf16" in said
    assert len(steps(read_metrics(out / "metrics.jsonl"))) == 4


def test_bf16_asked_for_on_a_cpu_without_bf16_instructions_is_said_with_the_fix(monkeypatch, teacher_dir):
    import warnings

    import torch

    from letrecipes.components import parallel

    monkeypatch.setattr(parallel, "cpu_bf16_slowdown", lambda: 40.0)
    with pytest.warns(UserWarning, match=r"dtype=bf16 on this CPU \(.*\), where a bf16 matmul took 40x an fp32 one .* "
                      r"Fix: dtype=fp32, or dtype=auto, which takes bf16 only where the device runs it at speed"):
        parallel.check_bf16_device(torch.device("cpu"), "dtype")
    with pytest.warns(UserWarning, match=r"teacher.dtype=bf16 on this CPU .* Fix: teacher.dtype=fp32, or"):
        load_teacher({"path": str(teacher_dir), "dtype": "bf16"}, "cpu")
    assert parallel.resolve_dtype("auto", "cpu") == ("fp32", parallel.bf16_is_slow("cpu"))
    assert load_teacher({"path": str(teacher_dir), "dtype": "auto"}, "cpu").model.tok_embeddings.weight.dtype \
        == torch.float32
    monkeypatch.setattr(parallel, "cpu_bf16_slowdown", lambda: 1.2)  # bf16 instructions: as fast, or faster
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel.check_bf16_device(torch.device("cpu"), "dtype")
        assert parallel.resolve_dtype("auto", "cpu") == ("bf16", None)
        assert parallel.resolve_dtype("fp32", "cpu") == ("fp32", None)
        assert load_teacher({"path": str(teacher_dir), "dtype": "auto"}, "cpu").model.tok_embeddings.weight.dtype \
            == torch.bfloat16


def test_eval_dtype_auto_scores_in_fp32_where_bf16_is_slow(teacher_dir, tmp_path, monkeypatch, capsys):
    from letrecipes import eval as eval_recipe
    from letrecipes.components import parallel

    held = tmp_path / "held.txt"
    held.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n",
                    encoding="utf-8")
    monkeypatch.setattr(parallel, "cpu_bf16_slowdown", lambda: 50.0)
    eval_recipe.recipe_main(["--config", "eval", f"checkpoint={teacher_dir}", "tasks=[]", "max_len=32", "dtype=auto",
                             "device=cpu", f"perplexity=[{held}]", f"output={tmp_path / 'scores.json'}"])
    assert "dtype=auto: fp32, since bf16 would run on this CPU" in capsys.readouterr().out
    assert "held" in json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))["perplexity"]
