"""Issue 16: the auto schedule measures the gradient ratio at the aligned hidden state
exactly, with no extra pass, and holds lambda at rho(step) times it."""

import pytest
import torch

from letrecipes.components.auto_weight import GradientRatio
from letrecipes.components.registry import ComponentError
from tests.test_reliability import LetRun, history


def toy_step(schedule, weight, micro_batches=1, seed=0):
    """h -> (NLL through an upper layer, alignment through a projector), like LET's graph."""
    torch.manual_seed(seed)
    upper, projector = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    sums = {}
    grads_nll, grads_align = [], []
    for _ in range(micro_batches):
        x = torch.randn(4, 8, requires_grad=True)
        h = torch.tanh(x * 2.0)
        target = torch.randn(4, 8)
        nll = upper(h).pow(2).mean()
        grads_nll.append(torch.autograd.grad(nll, h, retain_graph=True)[0])  # the reference, before the probe
        grads_align.append(torch.autograd.grad((projector(h) - target).pow(2).mean(), h)[0])
        tapped, figures = schedule.probe({3: h})
        align = (projector(tapped[3]) - target).pow(2).mean()
        ((nll + weight * align) / micro_batches).backward()
        for k, v in figures.items():
            sums[k] = sums.get(k, 0.0) + v / micro_batches
    g_nll, g_align = torch.cat(grads_nll), torch.cat(grads_align)
    return sums, (g_nll.norm() / g_align.norm()).item(), (weight * g_align.norm() / g_nll.norm()).item()


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_the_measured_ratio_is_the_true_one(micro_batches):
    schedule = GradientRatio(rho0=0.5, stop=100, smoothing=0.0)
    weight = torch.tensor(0.7)
    sums, true_ratio, true_rho = toy_step(schedule, weight, micro_batches)
    logged = schedule.update({**sums, "lambda": weight}, weight=weight)
    assert schedule.ratio.item() == pytest.approx(true_ratio, rel=1e-5)
    assert logged["rho_measured"].item() == pytest.approx(true_rho, rel=1e-5)
    # lambda then holds rho(step) times that ratio
    assert schedule(10).item() == pytest.approx(0.5 * 0.9 * true_ratio, rel=1e-5)


def test_a_measuring_step_leaves_nothing_alive_after_its_backward():
    # the tap's autograd node once held the tapped state through the probe: a cycle through
    # autograd that the collector cannot free, which leaked each measuring step's graph
    import gc
    import weakref

    schedule = GradientRatio(rho0=1.0, stop=10)
    h = torch.tanh(torch.randn(4, 8, requires_grad=True))
    tapped, figures = schedule.probe({3: h})
    alive = weakref.ref(tapped[3])
    (h.sum() + tapped[3].pow(2).sum()).backward()
    del tapped, h
    gc.collect()
    assert alive() is None and figures["_g_align_sq"].item() > 0


def test_lambda_starts_tiny_smooths_and_ends_at_stop():
    schedule = GradientRatio(rho0=1.0, stop=10, smoothing=0.5)
    assert schedule(0).item() == pytest.approx(1e-3) and schedule.measuring(0)
    schedule.ratio.fill_(2.0)
    sums, true_ratio, _ = toy_step(schedule, torch.tensor(1.0))
    schedule.update(sums, weight=torch.tensor(1.0))
    assert schedule.ratio.item() == pytest.approx(0.5 * 2.0 + 0.5 * true_ratio, rel=1e-5)
    assert schedule(10).item() == 0.0 and not schedule.measuring(10)
    assert "ratio" in schedule.state_dict()  # in every checkpoint with the aligner


@pytest.mark.parametrize("bad", [{"rho0": 0}, {"rho0": float("inf")}, {"measure_every": 0}, {"smoothing": 1.0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ComponentError, match="alignment.schedule"):
        GradientRatio(**{"stop": 10, **bad})


AUTO = ["alignment.schedule._component_=auto", "alignment.schedule.rho0=1.0"]  # let_tiny's own, made explicit


def test_auto_is_exact_across_kill_and_resume_and_logs_what_it_chose(let_overrides, tmp_path):
    run = LetRun(let_overrides)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(straight, *AUTO, "gradient_accumulation_steps=2")
    assert run(killed, *AUTO, "gradient_accumulation_steps=2", "debug.kill_at_step=5", check=False).returncode != 0
    run(killed, *AUTO, "gradient_accumulation_steps=2", "resume=true")
    assert history(killed) == history(straight)
    from letrecipes.components.metrics import read_metrics

    records = [r for r in read_metrics(straight / "metrics.jsonl") if "loss" in r]
    aligned = [r for r in records if r["step"] <= 6]
    assert all(r["lambda"] > 0 and r["rho"] >= 0 and "rho_measured" in r and r["grad_ratio"] > 0
               for r in aligned[1:])
    assert all(r["lambda0_equivalent"] == pytest.approx(1.0 * r["grad_ratio"]) for r in aligned[1:])
    assert aligned[0]["lambda"] == pytest.approx(1e-3)  # the first step measures
    assert all(r["lambda"] == 0 for r in records if r["step"] > 6)


@pytest.mark.slow
def test_auto_under_fsdp2_on_two_processes(let_overrides, tmp_path):
    run = LetRun(let_overrides)
    run(tmp_path, *AUTO, nproc=2)
    from letrecipes.components.metrics import read_metrics

    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r and r["step"] <= 6]
    assert all(r["lambda"] > 0 and r["rho_measured"] > 0 for r in records[1:])


def test_auto_with_a_logit_aligner_measures_at_the_logits(let_overrides, tmp_path):
    from letrecipes.components.metrics import read_metrics
    from tests.test_recipes import run_let

    run_let(*let_overrides, f"output_dir={tmp_path}", "max_steps=4", "alignment.loss=kl_logits", *AUTO,
            "alignment.schedule.stop=3")
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert records[1]["rho_measured"] > 0 and records[1]["lambda"] > 0 and records[-1]["lambda"] == 0
