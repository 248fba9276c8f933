"""Issue 13: the trained model leaves the project in Hugging Face format (final export and
offline conversion of step checkpoints) and comes back in as a teacher."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from letrecipes import pretrain
from letrecipes.components.export import export_checkpoint
from letrecipes.components.teachers import load_teacher

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e '.[test]')")

# Logits of our model and of transformers' Llama on the same fp32 weights: the two
# implementations differ in summation order only (measured max difference ~1e-6).
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def run(base_overrides, tmp_path_factory):
    """A tiny run with a step checkpoint, exported in fp32 (and untied, with grouped KV heads)."""
    out = tmp_path_factory.mktemp("export_run")
    pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, f"output_dir={out}", "max_steps=3",
                          "save_every=3", "export.dtype=fp32", "model.tie_word_embeddings=false",
                          "model.rope_base=50000"])
    return out


def project_logits(folder, tokens):
    teacher = load_teacher({"path": str(folder), "dtype": "fp32"})
    return teacher.logits(tokens)


def test_auto_model_loads_the_export_with_the_projects_logits_and_generates(run):
    final = run / "final"
    config = json.loads((final / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is False
    assert config["rope_theta"] == 50000 and config["num_key_value_heads"] == 1
    model = transformers.AutoModelForCausalLM.from_pretrained(str(final)).eval()
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model(tokens).logits
    torch.testing.assert_close(theirs, project_logits(final, tokens), atol=LOGITS_ATOL, rtol=0)

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(final))
    assert tokenizer.eos_token == "<|endoftext|>"
    prompt = tokenizer("To be, or not to be", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(generated[0]), str)


def test_default_export_is_bf16_and_readable_as_the_umask_says(base_overrides, tmp_path):
    """safetensors 0.8 writes 0600 whatever the umask (safetensors#782): the weights were the
    one file of final/ that another user of a shared machine (or a container's) could not read."""
    previous = os.umask(0o027)  # a group-readable site's umask
    try:
        pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path}", "max_steps=1"])
    finally:
        os.umask(previous)
    weights = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "final" / "config.json").read_text(encoding="utf-8"))["torch_dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (tmp_path / "final" / name).is_file()
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "final").iterdir()}
    assert set(modes.values()) == {0o640}, modes


def test_offline_conversion_of_a_step_checkpoint_equals_the_final_export(run, tmp_path):
    step = run / "checkpoints" / "step_00000003"
    result = subprocess.run([sys.executable, "-m", "letrecipes", "export", str(step), str(tmp_path / "hf"),
                             "--dtype", "fp32"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    final, converted = load_file(str(run / "final" / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert final.keys() == converted.keys() and all(torch.equal(final[k], converted[k]) for k in final)
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads((run / "final" / "config.json").read_text())


def test_sharded_export_writes_an_index_and_loads(run, tmp_path):
    out = export_checkpoint(run / "checkpoints" / "step_00000003", tmp_path / "sharded", torch.float32, max_shard_mb=0)
    index = json.loads((out / "model.safetensors.index.json").read_text(encoding="utf-8"))
    assert len(set(index["weight_map"].values())) > 3  # one tensor per shard at this limit
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, project_logits(run / "final", tokens), atol=LOGITS_ATOL, rtol=0)


def test_a_student_export_is_the_next_runs_teacher(run, base_overrides, tmp_path):
    from letrecipes import let_pretrain
    from letrecipes.components.metrics import read_metrics

    let_pretrain.recipe_main(["--config", "let_tiny", *base_overrides, f"teacher.path={run / 'final'}",
                              "teacher.dtype=fp32", f"output_dir={tmp_path}", "max_steps=2", "alignment.schedule.stop=2"])
    first = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r][0]
    assert -1.0 <= first["align_loss"] <= 1.0 and first["lambda"] > 0


def test_torchtunes_own_checkpointer_reads_the_export(run, tmp_path):
    """Fine-tuning with torchtune starts from the export: its HF checkpointer and Llama builder."""
    from torchtune.models.llama3_2 import llama3_2
    from torchtune.training import FullModelHFCheckpointer

    config = json.loads((run / "final" / "config.json").read_text(encoding="utf-8"))
    checkpointer = FullModelHFCheckpointer(checkpoint_dir=str(run / "final"), checkpoint_files=["model.safetensors"],
                                           model_type="LLAMA3_2", output_dir=str(tmp_path / "tt"))
    state = checkpointer.load_checkpoint()["model"]
    model = llama3_2(vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"],
                     num_heads=config["num_attention_heads"], num_kv_heads=config["num_key_value_heads"],
                     embed_dim=config["hidden_size"], max_seq_len=config["max_position_embeddings"],
                     intermediate_dim=config["intermediate_size"], rope_base=config["rope_theta"],
                     norm_eps=config["rms_norm_eps"], tie_word_embeddings=config["tie_word_embeddings"])
    model.load_state_dict(state)
    tokens = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), project_logits(run / "final", tokens), atol=LOGITS_ATOL, rtol=0)


def test_bad_conversions_are_one_line_and_overwrite_nothing(run, tmp_path):
    import shutil

    def export(*args):
        return subprocess.run([sys.executable, "-m", "letrecipes", "export", *map(str, args)], capture_output=True,
                              text=True, timeout=300)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    result = export(run / "checkpoints" / "step_00000003", busy)
    assert result.returncode == 1 and "exists and is not empty" in result.stderr and "--overwrite" in result.stderr
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    broken = tmp_path / "run" / "checkpoints" / "step_00000003"
    shutil.copytree(run / "checkpoints" / "step_00000003", broken)
    shutil.copy(run / "config.yaml", tmp_path / "run" / "config.yaml")
    (broken / "COMPLETE").unlink()
    result = export(broken, tmp_path / "out1")
    assert result.returncode == 1 and "is not a complete step checkpoint" in result.stderr
    (broken / "COMPLETE").write_text("step_00000003\n")
    (broken / "format.json").write_text(json.dumps({"format_version": 99}))
    result = export(broken, tmp_path / "out2")
    assert result.returncode == 1 and "checkpoint format 99" in result.stderr and "Fix: upgrade" in result.stderr
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
    assert "Traceback" not in result.stderr
    # a version that is no number (an edit; a checkpoint whose COMPLETE marker lists no sizes and
    # digests, as one written before they were): TypeError "'>' not supported between str and int"
    from letrecipes.components.checkpointing import CheckpointError
    from letrecipes.components.export import export_checkpoint

    for version in ("2", None, [1], True):
        (broken / "format.json").write_text(json.dumps({"format_version": version}))
        with pytest.raises(CheckpointError, match=r"format.json gives format_version=.*, which is no version: the "
                                                  r"file was edited or damaged. Fix: use another checkpoint"):
            export_checkpoint(broken, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()

    result = export(run, tmp_path / "out3")  # the run folder instead of one of its checkpoints
    assert result.returncode == 1 and "is a training run's folder, not a checkpoint" in result.stderr
    assert str(run / "checkpoints" / "step_00000003") in result.stderr and str(run / "final") in result.stderr
    assert not (tmp_path / "out3").exists()
    # its checkpoints folder, or one file of a step checkpoint: the folder that was meant is named
    from letrecipes.components.export import ExportError, export_any

    step = run / "checkpoints" / "step_00000003"
    with pytest.raises(ExportError, match=r"is a training run's checkpoints folder, not a checkpoint. Fix: give one "
                                          r"of its step checkpoints \(.*step_00000003\)"):
        export_any(run / "checkpoints", tmp_path / "out4")
    with pytest.raises(ExportError, match=rf"__0_0.distcp' is one file of the step checkpoint {step}. Fix: give the "
                                          rf"folder, {step}."):
        export_any(step / "__0_0.distcp", tmp_path / "out4")
    assert not (tmp_path / "out4").exists()
    # a folder that holds no model is named by what the user typed (it said checkpoint.path, a key of nothing)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not a model")
    result = export(tmp_path / "notes", tmp_path / "out5")
    assert result.returncode == 1 and result.stderr.startswith("error: export: no teacher format recognises"), \
        result.stderr


def test_a_long_conversion_says_how_far_it_is(run, tmp_path, monkeypatch):
    from letrecipes.components import progress

    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)  # every tensor, as a 7B export every 10 s
    lines = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    export_checkpoint(run / "checkpoints" / "step_00000003", tmp_path / "hf", torch.float32)
    progress = [line for line in lines if line.startswith("export: ") and " MB converted into " in line]
    assert len(progress) > 10 and all("MB/s" in line and "ETA" in line for line in progress)
    done, expected = (float(x) for x in progress[-1].split("export: ")[1].split(" MB")[0].split(" of "))
    assert done == expected > 0  # the size it announces is the size it writes


def test_an_export_that_cannot_be_written_is_one_line_and_leaves_nothing(run, tmp_path):
    """safetensors raises its own error type around the OS's (`... (os error 27)`): it used to
    end the export in a traceback and leave a half-written <out>.tmp on the full disk."""
    from tests.test_run_safety import limit_file_size

    out = tmp_path / "hf"
    result = subprocess.run([sys.executable, "-m", "letrecipes", "export", str(run / "checkpoints" / "step_00000003"),
                             str(out)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=limit_file_size(4096))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: export: writing the export into {out}.tmp failed: a file size limit was reached (ulimit -f, or the "
        "filesystem's). Nothing was left behind. Fix: raise the file size limit, then run the same command again.")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["format.json", "config.yaml"])
def test_a_failing_disk_under_the_checkpoint_to_export_is_one_line(run, tmp_path, name):
    """An input/output error as `letrecipes export` read a step checkpoint's format.json or
    the run's config.yaml was an OSError traceback."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    step = run / "checkpoints" / "step_00000003"
    result = subprocess.run([sys.executable, str(repo / "tests" / "io_fault.py"), "--read", name, "EIO", "--",
                             "letrecipes", "export", str(step), str(tmp_path / "hf")], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: letrecipes export: reading or writing failed: an input/output error (a failing "
                           "disk or a lost network mount) (") and name in line, line
    assert not (tmp_path / "hf").exists()


def test_an_fp16_export_of_weights_beyond_its_range_is_refused_not_written_as_inf(run, tmp_path):
    """fp16 stops at 65504: a weight beyond it became inf in the export, a model that gives
    NaN, without a word. bf16 (the default) has fp32's range."""
    from letrecipes.components.export import ExportError, write_hf_folder

    teacher = load_teacher({"path": str(run / "final"), "dtype": "fp32"})
    args = teacher.model.model_args
    state = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    state["layers.1.mlp.w2.weight"][0, 0] = 1.0e5
    with pytest.raises(ExportError, match=r"export: layers.1.mlp.w2.weight holds values up to 1e\+05, beyond "
                                          r"float16's 65504: .* Fix: --dtype bf16"):
        write_hf_folder(state.items(), args, tmp_path / "fp16", None, torch.float16)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written
    write_hf_folder(state.items(), args, tmp_path / "bf16", None, torch.bfloat16)
    assert torch.isfinite(load_file(tmp_path / "bf16" / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]).all()


def test_a_student_with_llama3_scaled_rope_exports_it_and_transformers_agrees(base_overrides, tmp_path):
    """model.rope_scaling (Llama 3.1+'s four numbers, as torchtune's llama3_2_1b builder has
    them): the student rotates with them, the export states them, transformers reads them."""
    from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE

    from letrecipes.components.models import llama_model

    scaling = {"factor": 8, "low_freq_factor": 1, "high_freq_factor": 4, "original_max_position_embeddings": 16}
    model = llama_model(vocab_size=64, num_layers=1, num_heads=2, embed_dim=16, max_seq_len=64, rope_scaling=scaling)
    assert isinstance(model.layers[0].attn.pos_embeddings, Llama3ScaledRoPE)
    with pytest.raises(ValueError, match=r"model.rope_scaling has the keys \['factor'\]; Llama 3.1's scaled RoPE takes"):
        llama_model(vocab_size=64, num_layers=1, num_heads=2, embed_dim=16, max_seq_len=64, rope_scaling={"factor": 8})
    pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path}", "max_steps=2",
                          "export.dtype=fp32", "eval_every=0",
                          "model.rope_scaling={factor: 8, low_freq_factor: 1, high_freq_factor: 4, "
                          "original_max_position_embeddings: 16}"])
    config = json.loads((tmp_path / "final" / "config.json").read_text(encoding="utf-8"))
    assert config["rope_scaling"] == {"rope_type": "llama3", **scaling}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "final")).eval()
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, project_logits(tmp_path / "final", tokens), atol=LOGITS_ATOL, rtol=0)
    plain = json.loads((tmp_path / "final" / "config.json").read_text(encoding="utf-8"))
    plain.pop("rope_scaling")  # the comparison above can tell: without the scaling, 9e-4 apart (measured)
    (tmp_path / "final" / "config.json").write_text(json.dumps(plain))
    with torch.no_grad():
        unscaled = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "final")).eval()(tokens).logits
    assert (unscaled - theirs).abs().max() > 3 * LOGITS_ATOL


@pytest.mark.parametrize("recorded", [True, False])
def test_a_runs_relative_paths_are_read_as_the_run_read_them_from_anywhere(base_overrides, tokenizer_path, corpus_dir,
                                                                          tmp_path, monkeypatch, recorded):
    """A run started in its repository with `tokenizer.path: tok/tokenizer.json` and
    `data.source: corpus` (relative), then exported or evaluated from another folder (a
    job script's) found no tokenizer. Its relative paths are now read from the working
    directory it recorded, or (a run from before that record) from a folder it lies in."""
    import shutil

    from letrecipes.components.contamination import configured_data

    repo = tmp_path / "repo"
    (repo / "tok").mkdir(parents=True)
    shutil.copy(tokenizer_path, repo / "tok" / "tokenizer.json")
    shutil.copytree(corpus_dir, repo / "corpus")
    monkeypatch.chdir(repo)
    relative = [o for o in base_overrides if not o.startswith(("tokenizer.path=", "data.source=", "data.cache_dir="))]
    pretrain.recipe_main(["--config", "pretrain_tiny", *relative, "tokenizer.path=tok/tokenizer.json",
                          "data.source=corpus", "data.cache_dir=cache", "output_dir=outputs/run", "max_steps=2",
                          "save_every=2", "eval_every=0"])
    run = repo / "outputs" / "run"
    info = json.loads((run / "run_info.json").read_text(encoding="utf-8"))
    assert info["cwd"] == str(repo)
    if not recorded:  # a run from before the working directory was recorded
        info.pop("cwd")
        info.pop("data_folders")
        (run / "run_info.json").write_text(json.dumps(info))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = export_checkpoint(run / "checkpoints" / "step_00000002", elsewhere / "export")
    assert (out / "tokenizer.json").read_bytes() == (repo / "tok" / "tokenizer.json").read_bytes()
    assert configured_data(run) == [str(p) for p in sorted((repo / "cache").glob("prepared-*"))]


def test_a_checkpoint_being_read_outlives_its_runs_rotation_until_the_reader_is_done(base_overrides, tmp_path,
                                                                                      monkeypatch, capsys):
    """`letrecipes export` (or the eval recipe) reading a live run's oldest checkpoint lost it
    to the run's next save: "writing the export failed: the path does not exist (__0_0.distcp)"."""
    from letrecipes.components import checkpointing

    listed, reader = {}, {}
    finalize = checkpointing.Checkpointer._finalize

    def finalize_while_step_1_is_read(self, tmp, final, *args):
        step = int(final.name[len(checkpointing.STEP_PREFIX):])
        if step == 2:  # a reader opens step 1 as step 2 is saved, and is done before step 4's save
            reader["step_1"] = checkpointing.held_for_reading(self.dir / "step_00000001", "export")
            reader["step_1"].__enter__()
        if step == 4:
            reader["step_1"].__exit__(None, None, None)
        finalize(self, tmp, final, *args)
        listed[step] = sorted(p.name for p in self.dir.iterdir())

    monkeypatch.setattr(checkpointing.Checkpointer, "_finalize", finalize_while_step_1_is_read)
    pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path / 'run'}",
                          "max_steps=5", "save_every=1", "keep_last_checkpoints=1", "eval_every=0"])
    assert listed[2] == ["step_00000001", "step_00000002"] and listed[3] == ["step_00000001", "step_00000003"]
    assert listed[4] == ["step_00000004"] and listed[5] == ["step_00000005"]
    assert capsys.readouterr().out.count("checkpoint: step_00000001 kept past keep_last_checkpoints=1 while another "
                                         "process reads it (letrecipes export, the eval recipe); a later save "
                                         "removes it") == 1


def test_overwrite_refuses_to_delete_a_checkpoint_another_process_reads(base_overrides, tmp_path, monkeypatch, capsys):
    """overwrite=true deleted the run's checkpoints under an export reading one; the export then
    failed half-way with an error about writing its own output."""
    from letrecipes.components import checkpointing
    from tests.test_hostile_input import digest

    args = ["--config", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path / 'run'}", "max_steps=4",
            "save_every=2", "eval_every=0"]
    pretrain.recipe_main(args)
    read = tmp_path / "run" / "checkpoints" / "step_00000002"
    before = digest(tmp_path / "run")
    capsys.readouterr()
    with checkpointing.held_for_reading(read, "export"):
        with pytest.raises(SystemExit) as refused:
            pretrain.recipe_main([*args, "overwrite=true"])
        assert digest(tmp_path / "run") == before  # refused before anything was built or deleted
        assert str(refused.value.code).startswith(f"error: overwrite=true would delete {read} while another "
                                                  "process reads it")
        # a reading that began after the guard looked: the start over stops at the held one, which stays whole
        monkeypatch.setattr(checkpointing, "being_read", lambda folder: False)
        with pytest.raises(SystemExit) as late:
            pretrain.recipe_main([*args, "overwrite=true"])
        assert late.value.code == refused.value.code
        assert checkpointing.complete_checkpoints_in(read.parent) == [read]
    monkeypatch.undo()
    pretrain.recipe_main([*args, "overwrite=true"])  # the reader is done: the run starts over
    assert "step 4/4" in capsys.readouterr().out


def test_a_runs_final_export_is_held_while_an_evaluation_reads_it(base_overrides, tmp_path, monkeypatch, capsys):
    """The eval recipe scoring a run's final/ held nothing: overwrite=true deleted it under
    lm-eval, `letrecipes export ... final --overwrite` and a resumed run's own export replaced
    it. Now the evaluation holds it while it scores, and each of those is one line, final/
    left whole; once the reader is done, resume=true writes the new export. (A relaunch used
    to take any final/ for the run's own, here step 4's export of a run at step 6: "the run
    is complete, ... left as they are". An export now records its step.)"""
    from letrecipes import cli
    from letrecipes import eval as eval_recipe
    from letrecipes.components import checkpointing
    from letrecipes.components.evaluation import Item, write_task
    from letrecipes.components.run_folder import exported_step
    from letrecipes.components.run_status import describe_status, run_status
    from tests.test_hostile_input import digest

    run = tmp_path / "run"
    args = ["--config", "pretrain_tiny", *base_overrides, f"output_dir={run}", "save_every=2", "eval_every=0"]
    pretrain.recipe_main([*args, "max_steps=4"])
    final = run / "final"
    held_while_scored = []

    def scored_while_held(folder, *rest, **kwargs):  # lm-eval's part, stood in for: is the folder held meanwhile?
        held_while_scored.append(checkpointing.being_read(Path(folder)))
        raise KeyboardInterrupt  # the scoring is not what is tested: stop here, as a Ctrl-C would

    monkeypatch.setattr(eval_recipe, "run_lm_eval", scored_while_held)
    task = write_task(tmp_path / "task.jsonl", [Item("To be, or not to", [" be", " cheese"], 0)])
    with pytest.raises(KeyboardInterrupt):
        eval_recipe.recipe_main(["--config", "eval", f"checkpoint={final}", f"tasks=[{task}]", "contamination=null"])
    assert held_while_scored == [True] and not checkpointing.being_read(final)  # released however it ends
    before, final_before = digest(run), digest(final)
    capsys.readouterr()
    with checkpointing.held_for_reading(final, "checkpoint"):
        with pytest.raises(SystemExit) as refused:
            pretrain.recipe_main([*args, "max_steps=4", "overwrite=true"])
        assert str(refused.value.code).startswith(f"error: overwrite=true would delete {final} while another process "
                                                  "reads it")
        with pytest.raises(SystemExit) as exported:
            cli.main(["export", str(run / "checkpoints" / "step_00000004"), str(final), "--overwrite"])
        assert str(exported.value.code).startswith(f"error: export: {final} is being read by another process")
        assert digest(run) == before
        with pytest.raises(SystemExit) as kept:  # a resumed run trains on, and leaves the read export to its reader
            pretrain.recipe_main([*args, "max_steps=6", "resume=true"])
        assert str(kept.value.code).startswith(f"error: output_dir: {final} is being read by another process")
        assert "Fix: run the same command with resume=true (a finished run only exports) once that reader is done" \
            in str(kept.value.code)
        assert digest(final) == final_before and not (run / "final.tmp").exists()
    # trained to step 6, its export still step 4's: not finished, and a relaunch writes it (it took step 4's for its own)
    status = run_status(run)
    assert status["state"] == "stopped" and status["step"] == 6 and status["final_step"] == 4
    assert "final export: of step 4, an earlier one" in describe_status(status)
    pretrain.recipe_main([*args, "max_steps=6", "resume=true"])  # the reader is done: the finished run exports
    assert "exported" in capsys.readouterr().out and digest(final) != final_before
    assert run_status(run)["state"] == "finished" and exported_step(final) == 6


def test_a_checkpoint_removed_as_its_reading_began_is_one_line_naming_the_newest(run, tmp_path):
    import shutil
    import threading

    from letrecipes.components.checkpointing import CheckpointError, held_for_reading, remove_unless_read

    checkpoints = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        shutil.copytree(run / "checkpoints" / "step_00000003", checkpoints / f"step_{step:08d}")
    with held_for_reading(checkpoints / "step_00000003", "export"):
        assert not remove_unless_read(checkpoints / "step_00000003")
    assert remove_unless_read(checkpoints / "step_00000003") and not (checkpoints / "step_00000003").exists()
    newest = f"read one it keeps ('{checkpoints / 'step_00000006'}', '{checkpoints / 'step_00000009'}')"
    with pytest.raises(CheckpointError, match="was removed by its run as the reading began") as gone:
        with held_for_reading(checkpoints / "step_00000003", "export"):
            pass
    assert newest in str(gone.value)
    # the reader opened it just before the rotation took it: it waits out the removal, then says so
    import fcntl

    remover = os.open(checkpoints / "step_00000006" / "COMPLETE", os.O_RDONLY)
    fcntl.flock(remover, fcntl.LOCK_EX)
    failed = []

    def read():
        try:
            with held_for_reading(checkpoints / "step_00000006", "checkpoint"):
                failed.append(None)
        except CheckpointError as err:
            failed.append(err)

    thread = threading.Thread(target=read)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive()  # waiting for the removal
    shutil.rmtree(checkpoints / "step_00000006")
    os.close(remover)
    thread.join(10)
    assert str(failed[0]).startswith(f"checkpoint: '{checkpoints / 'step_00000006'}' was removed by its run")


def test_converting_to_bf16_on_a_cpu_without_bf16_instructions_says_nothing_of_its_speed(teacher_dir, tmp_path,
                                                                                        monkeypatch):
    """An export casts weights; it computes nothing in bf16, so the warning for a bf16 run on a
    CPU without bf16 instructions is not for it (it was printed before every export there)."""
    import warnings

    from letrecipes.components import parallel
    from letrecipes.components.export import export_any

    monkeypatch.setattr(parallel, "cpu_bf16_slowdown", lambda: 50.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_any(teacher_dir, tmp_path / "out", torch.bfloat16)  # a Hugging Face folder: read as a teacher
    assert load_file(tmp_path / "out" / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
