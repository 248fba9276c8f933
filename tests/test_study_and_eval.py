"""Issue 5's machinery: the multiple-choice scorer, the eval recipe, logit KD, speedups and
the study runner's plumbing (a two-arm suite of a few steps; the full suites are not run here)."""

import json
import math

import pytest
import torch

from benchmarks import let_study
from letrecipes.components.alignment import LogitKL
from letrecipes.components.evaluation import EvalError, Item, continuation_loglikelihoods, read_task, score_task, write_task
from letrecipes.components.metrics import read_metrics
from letrecipes.components.models import llama_model
from letrecipes import eval as eval_recipe
from letrecipes import let_pretrain
from tests.test_recipes import expect_setup_error

TINY = ["model.num_layers=2", "model.embed_dim=32", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_dim=64"]


# ----------------------------------------------------------------- scorer
def byte_encode(text):
    return list(text.encode("utf-8"))


def prefers(byte: int, p: float = 0.9):
    """A 'model' whose next-token distribution is fixed: ``p`` on one byte, the rest spread evenly."""
    logits = torch.full((256,), math.log((1 - p) / 255))
    logits[byte] = math.log(p)
    return lambda tokens: logits.expand(*tokens.shape, 256)


def test_scorer_on_hand_made_items_with_known_answers():
    items = [Item("q:", ["aaaa", "b"], 0), Item("q:", ["b", "aa"], 1), Item("q:", ["bbb", "a"], 0)]
    result = score_task(prefers(ord("a")), byte_encode, items, eos_id=0, batch_size=2)
    # A model that loves "a" picks the a-choices: right on items 0 and 1, wrong on item 2.
    assert result["acc"] == pytest.approx(2 / 3)
    assert result["acc_norm_chars"] == pytest.approx(2 / 3) and result["acc_norm_tokens"] == pytest.approx(2 / 3)
    assert result["chance"] == pytest.approx(0.5) and result["n"] == 3


def test_length_normalisation_changes_the_winner():
    # Uniform model: every byte costs log(256). Unnormalised, the shorter choice always wins;
    # per byte, the two tie and the first (here the longer, right one) is kept.
    uniform = lambda tokens: torch.zeros(*tokens.shape, 256)  # noqa: E731
    result = score_task(uniform, byte_encode, [Item("ctx", ["long answer", "short"], 0)], eos_id=0)
    assert result["acc"] == 0.0 and result["acc_norm_chars"] == 1.0


def test_batched_scores_equal_one_at_a_time_with_a_real_model():
    torch.manual_seed(0)
    model = llama_model(vocab_size=64, num_layers=2, num_heads=2, embed_dim=32, max_seq_len=64).eval()
    fn = lambda tokens: model(tokens)  # noqa: E731
    requests = [([1, 2, 3], [4, 5]), ([7], [8, 9, 10, 11]), ([3, 3, 3, 3, 3, 3], [1]), ([0], [2])]
    one = continuation_loglikelihoods(fn, requests, batch_size=1)
    batched = continuation_loglikelihoods(fn, requests, batch_size=4)
    assert one == pytest.approx(batched, abs=1e-5)
    # and the value is the sum of the right log-probabilities
    logp = torch.log_softmax(model(torch.tensor([[1, 2, 3, 4]])), -1)[0]
    assert one[0] == pytest.approx((logp[2, 4] + logp[3, 5]).item(), abs=1e-5)


def test_task_files_round_trip_and_bad_ones_are_named(tmp_path):
    path = write_task(tmp_path / "t.jsonl", [Item("c", ["x", "y"], 1)])
    assert read_task(path)[0] == Item("c", ["x", "y"], 1)
    (tmp_path / "bad.jsonl").write_text('{"context": "c", "choices": ["only one"], "gold": 0}\n')
    with pytest.raises(EvalError, match=r"bad.jsonl:1: needs at least 2 choices"):
        read_task(tmp_path / "bad.jsonl")
    with pytest.raises(EvalError, match="fetch_eval_tasks"):
        read_task(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------- logit KD
def test_logit_kl_is_zero_only_for_equal_distributions():
    loss = LogitKL()
    a = torch.randn(2, 5, 11)
    assert loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(a, a + 3.0).item() == pytest.approx(0.0, abs=1e-5)  # a shift is the same distribution
    assert loss(a, torch.randn(2, 5, 11)).item() > 0.01
    assert loss.target == "logits"


def test_rkd_arm_runs_through_the_let_recipe(let_overrides, tmp_path):
    let_pretrain.recipe_main(["--config", "let_tiny", *let_overrides, f"output_dir={tmp_path}", "max_steps=4",
                              "alignment.loss=kl_logits", "alignment.schedule._component_=step",
                              "alignment.schedule.lambda0=0.5", "alignment.schedule.stop=2"])
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["lambda"] for r in records] == [0.5, 0.5, 0.0, 0.0]
    assert records[0]["align_loss"] > 0 and "cosine" not in records[0]
    assert records[0]["loss"] == pytest.approx(records[0]["nll"] + 0.5 * records[0]["align_loss"], rel=1e-5)


# ----------------------------------------------------------------- eval recipe
def test_eval_recipe_on_an_export_and_on_a_step_checkpoint(base_overrides, teacher_dir, tmp_path):
    from letrecipes import pretrain

    task = write_task(tmp_path / "tiny_task.jsonl", [Item("To be, or not to", [" be", " cheese"], 0)] * 3)
    eval_recipe.recipe_main(["--config", "eval", f"checkpoint={teacher_dir}", f"tasks=[{task}]",
                             f"output={tmp_path / 'export.json'}"])
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["tasks"]["tiny_task"]["n"] == 3 and report["tasks"]["tiny_task"]["chance"] == 0.5
    pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, *TINY, f"output_dir={tmp_path / 'run'}",
                          "max_steps=2", "save_every=1", "export.dtype=fp32"])
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    eval_recipe.recipe_main(["--config", "eval", f"checkpoint={step}", f"tasks=[{task}]",
                             f"output={tmp_path / 'step.json'}"])
    from_step = json.loads((tmp_path / "step.json").read_text())
    eval_recipe.recipe_main(["--config", "eval", f"checkpoint={tmp_path / 'run' / 'final'}", f"tasks=[{task}]",
                             f"output={tmp_path / 'final.json'}"])
    from_final = json.loads((tmp_path / "final.json").read_text())
    assert from_step["step"] == 2
    # the step-2 checkpoint and the final export are the same weights: the same scores
    assert from_step["tasks"]["tiny_task"]["acc"] == from_final["tasks"]["tiny_task"]["acc"]


@pytest.mark.parametrize("make, named", [
    (lambda tmp: tmp / "missing", "checkpoint: nothing at"),
    (lambda tmp: (tmp / "run" / "checkpoints" / "step_00000004").mkdir(parents=True) or
     tmp / "run" / "checkpoints" / "step_00000004", "config.yaml"),
])
def test_eval_recipe_names_a_bad_checkpoint_in_one_line(make, named, tmp_path):
    task = write_task(tmp_path / "tiny_task.jsonl", [Item("a", [" b", " c"], 0)])
    message = expect_setup_error(eval_recipe.recipe_main, ["--config", "eval", f"checkpoint={make(tmp_path)}",
                                                           f"tasks=[{task}]", f"output={tmp_path / 'out.json'}"],
                                 match=named)
    assert message.startswith("error: checkpoint: ")
    assert not (tmp_path / "out.json").exists()


# ----------------------------------------------------------------- study
def test_speedup_on_synthetic_curves():
    assert let_study.steps_to_reach([(10, 5.0), (20, 4.0), (30, 3.0)], 3.5) == pytest.approx(25.0)
    assert let_study.steps_to_reach([(10, 5.0), (20, 4.0)], 3.0) is None
    baseline = [{"step": s, "val_loss": 6 - s / 100, "train_time_s": s * 1.0} for s in (100, 200, 300, 400)]
    arm = [{"step": s, "val_loss": 6 - s / 50, "train_time_s": s * 1.5} for s in (100, 200, 300, 400)]
    result = let_study.speedups(baseline, arm)  # baseline ends at 2.0, reached by the arm at step 200
    assert result["speedup_steps"] == pytest.approx(2.0) and result["speedup_tokens"] == pytest.approx(2.0)
    assert result["speedup_wall_clock"] == pytest.approx(400 / 300)  # its steps cost 1.5x
    assert let_study.fmt([2.0, None]) == "not reached (1/2)" and let_study.fmt([1.0, 2.0]) == "1.50 [1.00, 2.00]"


def test_two_arm_suite_writes_json_tables_plots_and_skips_finished_runs(corpus_dir, tokenizer_path, tmp_path):
    tasks = tmp_path / "tasks"
    write_task(tasks / "hand_made.jsonl", [Item("To be, or not to", [" be", " cheese"], 0)] * 4)
    scale = {"teacher_steps": 6, "regime_steps": {"short": 4}, "student": TINY, "seq_len": 32, "batch_size": 4,
             "teacher": ["model.num_layers=1", "model.embed_dim=16", "model.num_heads=2", "model.num_kv_heads=1",
                         "model.intermediate_dim=32"]}
    args = ["--suite", "smoke", "--out", str(tmp_path / "study"), "--corpus", str(corpus_dir), "--tokenizer",
            str(tokenizer_path), "--tasks", str(tasks), "--plot-dir", str(tmp_path / "plots"), "--scale",
            json.dumps(scale)]
    assert let_study.main(args) == 0
    report = json.loads((tmp_path / "study" / "study_smoke.json").read_text())
    arms = report["regimes"]["short"]["arms"]
    assert set(arms) == {"baseline", "let"}
    assert arms["baseline"][0]["speedup_steps"] == pytest.approx(1.0)
    assert set(arms["let"][0]["accuracy"]) == {"hand_made", "cloze_heldout"}
    assert sorted(arms["let"][0]["accuracy_by_step"]) == ["1", "2", "3", "4"]  # eval at every checkpoint
    assert (tmp_path / "plots" / "study_smoke_short.png").stat().st_size > 10_000
    assert "| let | 1 |" in (tmp_path / "study" / "study_smoke.md").read_text()
    final = tmp_path / "study" / "runs" / "short" / "seed0" / "let" / "final" / "model.safetensors"
    written = final.stat().st_mtime_ns
    assert let_study.main(args) == 0  # everything finished: nothing is trained again
    assert final.stat().st_mtime_ns == written
