"""benchmarks/gpu_check.py at tiny sizes on CPU: every check of the GPU script runs, so it
cannot rot while no GPU is at hand (the speed and memory targets are GPU-only)."""

import json

from benchmarks import gpu_check


def test_gpu_check_runs_every_check_in_cpu_mode(corpus_dir, tokenizer_path, tmp_path, capsys):
    out = tmp_path / "gpu_check_cpu.json"
    assert gpu_check.main(["--cpu", "--corpus", str(corpus_dir), "--tokenizer", str(tokenizer_path),
                           "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu" and set(report["throughput"]) == {"bf16", "float8"}
    assert all(arm["tokens_per_s"] > 0 for arm in report["throughput"].values())
    assert report["let"]["teacher_time_share"] > 0  # the teacher ran in the LET arm
    assert report["resume"]["sync"]["equal_losses"] and report["resume"]["async"]["equal_losses"]
    assert report["export"]["equal_logits"]
    assert report["targets"]["float8_at_least_1.3x_bf16"] is None  # not judged on a CPU
    assert report["table"].count("\n| (") == 5 and "| (c) resume" in capsys.readouterr().out
    assert not (tmp_path / "work").exists()  # its run folders are removed
