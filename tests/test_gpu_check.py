"""benchmarks/gpu_check.py at tiny sizes on CPU: every check of the GPU script runs, so it
cannot rot while no GPU is at hand (the speed and memory targets are GPU-only)."""

import json

import pytest

from benchmarks import gpu_check
from tests.launch import needs_compile


@needs_compile
def test_gpu_check_runs_every_check_in_cpu_mode(corpus_dir, tokenizer_path, tmp_path, capsys):
    out = tmp_path / "gpu_check_cpu.json"
    assert gpu_check.main(["--cpu", "--corpus", str(corpus_dir), "--tokenizer", str(tokenizer_path),
                           "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["mode"] == "cpu" and set(report["throughput"]) == {"bf16", "float8"}
    assert all(arm["tokens_per_s"] > 0 for arm in report["throughput"].values())
    assert report["let"]["teacher_time_share"] > 0  # the teacher ran in the LET arm
    assert report["resume"]["sync"]["equal_losses"] and report["resume"]["async"]["equal_losses"]
    assert report["export"]["equal_logits"]
    assert report["targets"]["float8_at_least_1.3x_bf16"] is None  # not judged on a CPU
    assert report["profiler"]["trace_bytes"] > 0 and report["profiler"]["kernels_traced"] is None  # no kernels on CPU
    assert report["table"].count("\n| (") == 6 and "| (e) the recipes' profiler" in capsys.readouterr().out
    assert not (tmp_path / "work").exists()  # its run folders are removed


@needs_compile
def test_the_follow_up_gpu_scripts_run_in_cpu_mode(corpus_dir, tokenizer_path, tmp_path):
    from benchmarks import gpu_profile, gpu_variants

    from letrecipes._config import load_config
    from letrecipes._schema import validate

    data = ["--cpu", "--corpus", str(corpus_dir), "--tokenizer", str(tokenizer_path)]
    # every arm's settings are valid keys and values of its config (a key renamed is caught here)...
    for name, (_, let, extra) in gpu_variants.ARMS.items():
        validate(load_config("let_7b" if let else "pretrain_7b", extra), with_teacher=False)
    # ...and the LET pair runs: let_7b's depth (16 tiny blocks on a CPU), each arm in a process of
    # its own (all seven default arms took 80 s of the suite; the GPU run takes them all)
    pair = ["let7b_bf16", "let7b_let"]
    assert set(pair) <= set(gpu_variants.DEFAULT_ARMS)
    assert gpu_variants.main([*data, "--work", str(tmp_path / "v"), "--out", str(tmp_path / "v.json"),
                              "--arms", ",".join(pair)]) == 0
    variants = json.loads((tmp_path / "v.json").read_text(encoding="utf-8"))
    assert set(variants["arms"]) == set(pair) and not variants["errors"]
    assert all(arm["tokens_per_s"] > 0 and arm["peak_over_estimate"] > 0 for arm in variants["arms"].values())
    assert {name: arm["blocks"] for name, arm in variants["arms"].items()} == {name: 8 * 2 for name in pair}
    assert variants["arms"]["let7b_let"]["teacher_time_share"] > 0
    assert set(variants["let_over_baseline"]) == {"let7b_let"} and variants["let_over_baseline"]["let7b_let"] > 0
    for script in (gpu_variants, gpu_profile):  # a typo is refused before any work
        with pytest.raises(SystemExit):
            script.main([*data, "--arms", "fused_adamw,let7b_bf16,bogus"])
    # two of its arms (each is a process of its own; the GPU run takes them all)
    assert gpu_profile.main([*data, "--work", str(tmp_path / "p"), "--out", str(tmp_path / "p.json"),
                             "--arms", "foreach_adamw,float8_rowwise"]) == 0
    profile = json.loads((tmp_path / "p.json").read_text(encoding="utf-8"))
    assert set(profile["arms"]) == {"foreach_adamw", "float8_rowwise"}
    assert all(arm["tokens_per_s"] > 0 for arm in profile["arms"].values())
    assert profile["profile"]["top_kernels"] and sum(profile["profile"]["ms_per_step_by_kind"].values()) > 0


def test_the_memory_peak_is_found_and_its_allocations_grouped_by_site():
    from benchmarks.gpu_profile import peak_allocations

    def frame(filename, name):
        return {"filename": filename, "line": 1, "name": name}

    model = [frame("/x/torch/nn/functional.py", "linear"), frame("/x/letrecipes/components/models.py", "forward")]
    loss = [frame("/x/torch/nn/functional.py", "cross_entropy")]
    gib = 2**30
    trace = [{"action": "alloc", "addr": 1, "size": 2 * gib, "frames": model},
             {"action": "alloc", "addr": 2, "size": 3 * gib, "frames": loss},
             {"action": "free_completed", "addr": 9, "size": 1 * gib},   # allocated before recording
             {"action": "free_completed", "addr": 2, "size": 3 * gib},
             {"action": "alloc", "addr": 3, "size": 1 * gib, "frames": loss}]
    # at the end: 4 GiB untraced (5 before recording, 1 freed), addr 1 and 3 alive
    segments = [{"device": 0, "blocks": [{"size": 4 * gib, "state": "active_allocated"},
                                         {"size": 2 * gib, "state": "active_allocated"},
                                         {"size": 1 * gib, "state": "active_allocated"},
                                         {"size": 8 * gib, "state": "inactive"}]}]
    peak = peak_allocations({"device_traces": [trace], "segments": segments})
    assert peak["peak_gib"] == 10 and peak["peak_event"] == 1 and peak["untraced_gib"] == 5
    assert peak["sites"] == [{"gib": 3.0, "site": "functional.py:1 cross_entropy"},
                             {"gib": 2.0, "site": "models.py:1 forward"}]


def test_the_deepest_arms_are_let_7bs_depth_where_the_gpu_holds_it_and_16_blocks_on_an_80_gb_one():
    """The let7b arms need about 119 GiB at world size 1: on an H100 all three were skipped,
    and a lent H100's call measured nothing of LET at depth. `--arms deepest` takes 16 blocks there."""
    from benchmarks import gpu_variants
    from benchmarks.gpu_check import SIZES

    size, vocab = SIZES["gpu"], lambda shape: shape.get("vocab_size") or 128256
    h200, h100 = 139.8, 79.1  # what torch.cuda.mem_get_info reports as their totals, in GiB
    assert gpu_variants.deepest_arms(size, vocab, h200) == ["let7b_bf16", "let7b_let", "let7b_float8"]
    assert gpu_variants.deepest_arms(size, vocab, h100) == ["bf16_4x_blocks", "let_4x_blocks", "float8_4x_blocks"]
    assert gpu_variants.deepest_arms(size, vocab, 40.0) == ["bf16_4x_blocks", "let_4x_blocks", "float8_4x_blocks"]
    assert gpu_variants.deepest_arms(SIZES["cpu"], vocab, None)[1] == "let7b_let"
    let16 = gpu_variants.arm_estimate("let_4x_blocks", size, vocab)
    assert let16[0].num_layers == 16 and let16[1].total_gb <= gpu_variants.MEMORY_MARGIN * h100
    assert gpu_variants.LET_BASELINES["let_4x_blocks"] == "bf16_4x_blocks"


def test_the_settings_fuzz_picks_only_valid_configs():
    """benchmarks/settings_fuzz.py tries combinations of valid settings: a key renamed here
    would turn every one of its runs into the same config error, and it would find nothing."""
    import random

    from benchmarks import settings_fuzz

    from letrecipes._config import load_config
    from letrecipes._schema import validate

    rng = random.Random(0)
    for _ in range(60):
        overrides, processes = settings_fuzz.pick_settings(rng, 4)
        cfg = load_config("let_tiny", [*settings_fuzz.TINY, *overrides])
        validate(cfg)  # the alignment components' options too
        assert processes in (1, 2, 4) and ("fsdp.replicate_degree" in str(overrides)) == (processes == 4)
