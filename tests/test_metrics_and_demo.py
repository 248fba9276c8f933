import json
import random
import shutil

import pytest

from letrecipes.components import progress
from letrecipes.components.metrics import MetricLogger, compare_runs, read_metric_records, read_metrics
from letrecipes.components.run_folder import records_from_the_end
from letrecipes.components.progress import ProgressClock, elapsed_and_eta
from letrecipes.demo import strip_markdown


def val(step, loss):
    return {"step": step, "loss": loss, "val_loss": loss}


def test_compare_runs_finds_the_first_step_at_the_baselines_final_loss():
    baseline = [val(10, 5.0), {"step": 15, "loss": 4.9}, val(20, 4.5), val(30, 4.2)]
    let = [val(10, 4.6), val(20, 4.2), val(30, 4.0)]
    result = compare_runs(baseline, let)
    assert result == {"baseline_final_val_loss": 4.2, "let_final_val_loss": 4.0, "baseline_steps": 30,
                      "let_steps_to_baseline": 20, "step_speedup": 1.5}


def test_compare_runs_when_let_never_gets_there():
    result = compare_runs([val(10, 4.0)], [val(10, 4.5)])
    assert result["let_steps_to_baseline"] is None and result["step_speedup"] is None
    with pytest.raises(ValueError, match="eval_every"):
        compare_runs([{"step": 1, "loss": 1.0}], [val(1, 1.0)])


def test_metric_logger_writes_one_json_object_per_call(tmp_path):
    logger = MetricLogger(tmp_path)
    logger.log({"step": 1, "loss": 2.0, "grad_norm": float("nan")})
    logger.log({"step": 2, "loss": 1.5})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["grad_norm"] is None  # NaN is not valid JSON


def test_reading_a_log_from_its_end_gives_its_records_newest_first_at_any_block_size(tmp_path):
    """The reader `letrecipes status` and the eval recipe use on long logs: each block's cut
    falls anywhere, inside a record or a multi-byte character; the same records and the same
    lines counted as no record as a whole read, in the other order."""
    rng = random.Random(0)
    lines = []
    for step in range(1, 200):
        lines.append(rng.choice([json.dumps({"step": step, "loss": rng.random(), "note": "dé" * rng.randint(0, 9)},
                                            ensure_ascii=False),
                                 json.dumps({"step": step, "loss": 1.0}), "", "  ", "[1, 2", '"text"', "\udcff\udcfe",
                                 '{"step": %d, "loss": 0.5, "byte": "\udcff"}' % step]))
    whole = "\n".join(lines) + "\n"
    for tail in ("", '{"step": 999, "loss": 1.'):  # the last line of a live run: not whole, left out
        path = tmp_path / "metrics.jsonl"
        path.write_bytes(whole.encode("utf-8", "surrogateescape") + tail.encode())
        records, unreadable = read_metric_records(path)
        for block in (1, 2, 3, 7, 64, 1000, 1 << 20):
            backwards = list(records_from_the_end(path, block_bytes=block))
            assert [r for r in backwards if r is not None] == records[::-1], block
            assert backwards.count(None) == unreadable, block
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert list(records_from_the_end(tmp_path / "empty.jsonl")) == []


def test_the_eta_drops_the_start_up_interval(monkeypatch):
    """Step 1 compiles (100 s), then steps take 1 s: the second log line's ETA is the
    remaining steps at 1 s each, not an average still weighed down by the compile."""
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    clock = ProgressClock(max_steps=1000, step=0, tokens_per_step=4096)
    now[0] = 100.0
    first = clock.update(1)
    assert first["eta_s"] == 999 * 100.0  # all that is known yet
    now[0] = 110.0
    assert clock.update(11)["eta_s"] == 989.0 and clock.update(11)["tokens_per_s_avg"] == 4096.0
    now[0] = 115.0  # from here on averaged: 2 steps/s moves the rate part of the way
    third = clock.update(21)
    assert 1.0 < third["tokens_per_s_avg"] / 4096 < 2.0 and third["elapsed_s"] == 115.0


def test_prepare_and_export_give_their_eta_as_a_clock():
    """Hours of prepare-data read as hours, not as 14400 s; nothing done yet has no ETA."""
    assert elapsed_and_eta(60.0, 1.0, 241.0) == "elapsed 1m00s, ETA 4h00m00s"
    assert elapsed_and_eta(5.0, 10, 10) == "elapsed 5s, ETA 0s"
    assert elapsed_and_eta(3.0, 0, 10) == "elapsed 3s, ETA unknown"


def test_strip_markdown_keeps_the_words():
    text = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n"
    assert strip_markdown(text) == "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO:\nWho's there?\n"


def test_the_demo_leaves_a_users_runs_alone_and_reuses_its_own(base_overrides, tmp_path, monkeypatch, capsys):
    from letrecipes import demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    users = tmp_path / "outputs" / "let_tiny"  # what the README's "Using it" commands make
    users.mkdir(parents=True)
    (users / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in users.rglob("*")}
    tiny = [*base_overrides, "max_steps=4", "eval_every=2", "save_every=0"]
    demo.main(tiny)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in users.rglob("*")} == before
    final = tmp_path / "outputs" / "demo" / "let_tiny" / "final" / "model.safetensors"
    written = final.stat().st_mtime_ns
    result = json.loads((tmp_path / "outputs" / "demo" / "result.json").read_text(encoding="utf-8"))
    assert result["baseline_steps"] == 4 and result["hardware"]["cpu_threads"] >= 1  # the machine behind its figures
    demo.main(tiny)  # a second demo reuses its finished stages
    assert final.stat().st_mtime_ns == written
    assert capsys.readouterr().out.count("already finished in outputs/demo/") == 3
    # a teacher trained anew: the LET student, trained against the old one, is trained again; the baseline is not
    shutil.rmtree(tmp_path / "outputs" / "demo" / "pretrain_tiny")
    demo.main(tiny)
    out = capsys.readouterr().out
    assert out.count("already finished in outputs/demo/") == 1 and "baseline_tiny: reused" in out
    assert "finished in outputs/demo/let_tiny with other settings (overrides [" in out and ", another teacher)" in out
    assert final.stat().st_mtime_ns != written
    # other overrides: every stage is trained again, where the table reported the earlier runs' figures
    demo.main([*tiny, "max_steps=2"])
    out = capsys.readouterr().out
    assert out.count("with other settings") == 3 and "already finished" not in out
    assert json.loads((tmp_path / "outputs" / "demo" / "result.json").read_text())["baseline_steps"] == 2


def test_ctrl_c_in_the_terminal_stops_a_demo_stage_once_saved_and_in_one_line(base_overrides, tmp_path):
    """The terminal sends Ctrl-C to the demo and its stage alike: subprocess.run killed the stage
    0.25 s into the save the signal asked for, and the demo ended in a KeyboardInterrupt traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from letrecipes.components.metrics import read_metrics

    demo = subprocess.Popen([sys.executable, "-m", "letrecipes.demo", *base_overrides, "max_steps=100000",
                             "save_every=0"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "outputs" / "demo" / "pretrain_tiny" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 180
        while not (metrics.is_file() and metrics.read_text(encoding="utf-8").count("\n") >= 2):
            assert time.monotonic() < deadline and demo.poll() is None
            time.sleep(0.2)
        os.killpg(demo.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
        _, err = demo.communicate(timeout=120)
    finally:
        demo.kill()
    lines = err.strip().splitlines()
    assert demo.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("error: demo stage 1 of 3 (pretrain_tiny) stopped (exit status 1; its reason is the "
                                "line above). Fix: run the demo again"), lines[-1]
    assert lines[-2].startswith("error: stopped by SIGINT after step "), lines[-2]
    step = int(lines[-2].split("after step ")[1].split(";")[0])
    assert read_metrics(metrics)[-1]["step"] <= step
    assert (metrics.parent / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()
