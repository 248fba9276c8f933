"""dry_run=true: every shipped config, both recipes, on the meta device in seconds."""

import pytest

from letrecipes import let_pretrain, pretrain
from letrecipes._config import available_configs
from letrecipes._dry_run import DryRunError, dry_run
from letrecipes._config import load_config


@pytest.mark.parametrize("config, billions, overhead", [("let_1b4", (1.3, 1.45), (0.02, 0.06)),
                                                        ("let_7b", (6.7, 7.6), (0.02, 0.08))])
def test_big_let_configs(config, billions, overhead, capsys):
    report = dry_run(load_config(config, ["dry_run_world_size=32"]), with_teacher=True)
    assert billions[0] < report["student_params"] / 1e9 < billions[1]
    assert overhead[0] < report["teacher_overhead"] < overhead[1]
    assert report["memory_per_gpu_gb"]["total"] < 80  # fits an 80 GB GPU at 32-way FSDP
    out = capsys.readouterr().out
    assert "teacher overhead while it runs" in out and "memory per GPU (world size 32" in out


def test_the_dry_run_weighs_network_against_compute_and_names_the_micro_batch(capsys):
    from letrecipes.components.estimate import block_params, total_params

    report = dry_run(load_config("let_7b", ["dry_run_world_size=32", "batch_size=2"]), with_teacher=True)
    timing = report["micro_batch_time"]
    args = _student_args()
    n = total_params(args)
    root = 2 * args.vocab_size * args.embed_dim + args.embed_dim  # untied embeddings and head, final norm
    # all-gather bf16 for the forward and again for the backward (all but the root and the last
    # block, which stay gathered) + reduce-scatter fp32, each moving (W-1)/W of it
    assert timing["communication_gb"] == pytest.approx((2 * n + 2 * (n - root - block_params(args)) + 4 * n)
                                                       * 31 / 32 / 1e9)
    assert timing["communication_s"] == pytest.approx(timing["communication_gb"] * 8 / 400)
    assert timing["communication_bound"] and timing["smallest_compute_bound_micro_batch"] == 4
    assert "WARNING: communication-bound" in capsys.readouterr().out
    shipped = dry_run(load_config("let_7b", ["dry_run_world_size=32"]), with_teacher=True)["micro_batch_time"]
    assert not shipped["communication_bound"]  # the shipped micro-batch is the one the dry run asks for
    assert shipped["compute_s"] == pytest.approx(4 * timing["compute_s"])  # micro-batch 8 against 2
    fast = dry_run(load_config("let_7b", ["dry_run_world_size=32", "batch_size=2", "dry_run_interconnect_gbps=3200"]),
                   with_teacher=True)["micro_batch_time"]
    assert not fast["communication_bound"] and fast["smallest_compute_bound_micro_batch"] == 1


def test_a_step_counts_the_forwards_that_checkpointing_runs_again_and_never_the_head():
    from letrecipes.components.estimate import forward_flops_per_token, train_flops_per_token

    args, seq = _student_args(), 2048  # 32 blocks
    forward, block = forward_flops_per_token(args, seq), forward_flops_per_token(args, seq, layers=1, head=False)
    assert train_flops_per_token(args, seq) == pytest.approx(3 * forward)
    assert train_flops_per_token(args, seq, "full") == pytest.approx(3 * forward + 32 * block)
    assert train_flops_per_token(args, seq, "selective", every=2) == pytest.approx(3 * forward + 16 * block)
    assert train_flops_per_token(args, seq, "selective", every=3) == pytest.approx(3 * forward + 11 * block)
    report = dry_run(load_config("let_7b", ["dry_run_world_size=32"]), with_teacher=True)
    assert report["teacher_overhead"] == pytest.approx(report["teacher_forward_flops_per_token"]
                                                       / (3 * forward + 32 * block))


def test_the_dry_runs_share_of_peak_is_also_said_as_the_mfu_the_training_log_would_show(capsys):
    """dry_run_mfu applies to the FLOPs the GPU runs (recompute included); the log's mfu counts
    the model's FLOPs only, so the dry run says what the log would read at the same speed."""
    report = dry_run(load_config("let_7b", ["dry_run_world_size=32", "dry_run_mfu=0.5"]), with_teacher=True)
    logged = 0.5 * report["student_train_flops_per_token"] / report["student_step_flops_per_token"]
    assert 0.3 < logged < 0.45  # full checkpointing: about a third more FLOPs than the model's
    assert f"the training log's mfu, which counts the model's FLOPs only, would read {100 * logged:.1f}%" \
        in capsys.readouterr().out
    dry_run(load_config("let_7b", ["dry_run_world_size=32", "activation_checkpointing.mode=none"]), with_teacher=True)
    assert "training log's mfu" not in capsys.readouterr().out  # without recompute the two are one figure


def test_activation_memory_follows_which_blocks_are_checkpointed():
    from letrecipes.components.estimate import GIB, memory_per_gpu

    args, tokens = _student_args(), 4 * 2048  # 32 blocks
    whole, kept = 34 * tokens * args.embed_dim / GIB, 2 * tokens * args.embed_dim / GIB

    def activations(mode, every=2):
        return memory_per_gpu(args, 32, 4, 2048, mode, checkpoint_every=every).activations_gb

    assert activations("none") == pytest.approx(32 * whole)
    assert activations("full") == pytest.approx(32 * kept + whole)  # one block whole again while recomputed
    assert activations("selective", 2) == pytest.approx(16 * whole + 16 * kept + whole)
    assert activations("selective", 4) == pytest.approx(24 * whole + 8 * kept + whole)


def _student_args():
    import torch

    from letrecipes.components import registry

    cfg = load_config("let_7b", [])
    with torch.device("meta"):
        return registry.build("model", cfg.model, "model", max_seq_len=cfg.data.seq_len).model_args


def test_let_1b4_reads_the_real_smollm2_shape_from_the_gguf_file():
    report = dry_run(load_config("let_1b4", []), with_teacher=True)
    assert report["teacher_params"] == 134_515_008  # the GGUF's metadata, not teacher.shape
    assert report["aligned_pairs_student_teacher"] == [(6, 30)]
    assert report["projector_params"] == 2048 * 576  # a linear map, student width 2048 -> teacher 576


LLAMA_3_2_1B = {  # config.json of meta-llama/Llama-3.2-1B (the shape only; no weights needed)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "vocab_size": 128256, "attention_bias": False, "mlp_bias": False,
}


def test_let_7b_dry_run_against_a_real_llama_3_2_1b_config(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_2_1B))
    report = dry_run(load_config("let_7b", [f"teacher.path={tmp_path}", "dry_run_world_size=32"]), with_teacher=True)
    assert report["teacher_params"] == 1_235_814_400  # Llama-3.2-1B's published size
    assert report["aligned_pairs_student_teacher"] == [(8, 16)]


QWEN3_0_6B = {  # config.json of Qwen/Qwen3-0.6B: heads wider than hidden / heads, q/k norms
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
    "rope_scaling": None, "sliding_window": None, "use_sliding_window": False, "tie_word_embeddings": True,
    "vocab_size": 151936, "attention_bias": False,
}


def test_a_real_qwen3_config_counts_its_published_size(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(QWEN3_0_6B))
    report = dry_run(load_config("let_7b", [f"teacher.path={tmp_path}", "dry_run_world_size=32"]), with_teacher=True)
    assert report["teacher_params"] == 596_049_920  # 0.44B non-embedding + 151,936 x 1,024 tied embeddings


@pytest.mark.parametrize("config", [c for c in available_configs() if not c.startswith("eval")])  # evals train nothing
def test_every_shipped_config_dry_runs_through_its_recipe(config, capsys, tokenizer_path, tmp_path):
    main = let_pretrain.recipe_main if config.startswith("let") else pretrain.recipe_main
    extra = [] if any(k in config for k in ("1b4", "7b", "smollm2")) else [f"tokenizer.path={tokenizer_path}",
                                                         "teacher.shape={num_layers: 3, num_heads: 4, "
                                                         "num_kv_heads: 2, embed_dim: 128, intermediate_dim: 384, "
                                                         "vocab_size: 512}", "teacher.path=/nonexistent"]
    if not config.startswith("let"):
        extra = [e for e in extra if not e.startswith("teacher.")]
    if "xtok" in config:  # its student reads the demo's tokenizer, which a clean checkout does not have
        extra = [f"tokenizer.path={tokenizer_path}"]
    main(["--config", config, "dry_run=true", *extra, f"teacher.tokenizer_dir={tmp_path}"])
    assert "dry run (nothing allocated" in capsys.readouterr().out


def test_dry_run_catches_a_bad_layer_map_without_weights():
    cfg = load_config("let_7b", ["alignment.layer_map=M2E", "alignment.projector=identity"])
    with pytest.raises(ValueError, match="identity needs equal widths"):
        dry_run(cfg, with_teacher=True)


def test_dry_run_rehearses_a_part_of_ones_own_on_the_meta_device(tmp_path, monkeypatch):
    """The aligner's rehearsal (components/aligner.py) runs where the dry run builds, on meta:
    a loss that detaches the student is named at 7B size without a weight or a step."""
    (tmp_path / "detached_loss.py").write_text(
        "from letrecipes.components.alignment import AlignmentLoss\n"
        "from letrecipes.components.registry import register\n"
        "@register('alignment_loss', 'detached_for_the_dry_run')\n"
        "class Detached(AlignmentLoss):\n"
        "    def per_token(self, pred, target):\n"
        "        return (pred - target).pow(2).mean(-1).detach()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config("let_7b", ["imports=[detached_loss]", "alignment.loss=detached_for_the_dry_run"])
    with pytest.raises(ValueError, match="alignment.loss=detached_for_the_dry_run: no gradient reaches the student"):
        dry_run(cfg, with_teacher=True)


def test_dry_run_without_teacher_description():
    cfg = load_config("let_7b", ["~teacher.shape"])
    with pytest.raises(DryRunError, match="teacher.shape"):
        dry_run(cfg, with_teacher=True)


def test_the_chunked_loss_is_counted_as_one_chunk_of_logits_and_the_output_gradient():
    from letrecipes.components.estimate import GIB, memory_per_gpu

    args = _student_args()
    vocab, dim, tokens = args.vocab_size, args.embed_dim, 4 * 2048
    plain = memory_per_gpu(args, 32, 4, 2048, "full")
    chunked = memory_per_gpu(args, 32, 4, 2048, "full", loss_chunk_tokens=1024)
    assert plain.loss_gb * GIB == pytest.approx(14 * tokens * vocab)
    assert chunked.loss_gb * GIB == pytest.approx(8 * 1024 * vocab + 6 * vocab * dim + 2 * tokens * dim)
    assert chunked.loss_gb < 0.3 * plain.loss_gb  # 4.0 against 13.7 GiB
    shipped = dry_run(load_config("let_7b", ["dry_run_world_size=32"]), with_teacher=True)["memory_per_gpu_gb"]
    assert shipped["loss"] == pytest.approx(memory_per_gpu(args, 32, 8, 2048, "full", loss_chunk_tokens=1024).loss_gb)


def test_a_run_computing_in_fp32_is_estimated_at_fp32_widths(tokenizer_path):
    """CPU runs compute in fp32 (dtype: fp32): activations, logits and gathered parameters
    are twice as wide as in bf16, and logits need no fp32 copy; the teacher's term follows
    teacher.dtype. The bf16 figures used to be given for both."""
    from letrecipes.components.estimate import GIB, block_params, memory_per_gpu

    args = _student_args()
    vocab, dim, tokens = args.vocab_size, args.embed_dim, 4 * 2048
    bf16 = memory_per_gpu(args, 32, 4, 2048, "none", fsdp=True, teacher=args)
    fp32 = memory_per_gpu(args, 32, 4, 2048, "none", fsdp=True, teacher=args, compute_bytes=4,
                          teacher_bytes_per_param=4)
    assert fp32.activations_gb == pytest.approx(2 * bf16.activations_gb)
    assert fp32.loss_gb * GIB == pytest.approx(12 * tokens * vocab) and bf16.loss_gb * GIB == pytest.approx(14 * tokens * vocab)
    root = vocab * dim * (1 if args.tie_word_embeddings else 2)
    assert (fp32.gathered_gb - bf16.gathered_gb) * GIB == pytest.approx(2 * root + 4 * block_params(args))
    assert fp32.teacher_gb == pytest.approx(2 * bf16.teacher_gb)
    assert fp32.weights_and_moments_gb == bf16.weights_and_moments_gb  # fp32 master weights either way
    report = dry_run(load_config("let_tiny", ["dtype=fp32", "teacher.dtype=fp32", f"tokenizer.path={tokenizer_path}"]),
                     with_teacher=False)
    assert report["memory_per_gpu_gb"]["compute_dtype"] == "fp32"


def test_a_reduction_deferred_to_the_last_micro_batch_trades_memory_for_traffic():
    """fsdp.reduce_every_micro_batch=false: the accumulated gradients are unsharded (4 bytes a
    parameter on every rank, not 4 / W) and a step's reduce-scatter runs once, not per micro-batch."""
    from letrecipes.components.estimate import GIB, memory_per_gpu, micro_batch_time, total_params

    args = _student_args()
    n = total_params(args)
    every = memory_per_gpu(args, 32, 2, 2048, "full", gradient_accumulation_steps=4)
    once = memory_per_gpu(args, 32, 2, 2048, "full", gradient_accumulation_steps=4, reduce_every_micro_batch=False)
    assert every.accumulated_gradients_gb * GIB == pytest.approx(4 * n / 32)
    assert once.accumulated_gradients_gb * GIB == pytest.approx(4 * n)
    assert once.forward_backward_gb - every.forward_backward_gb == pytest.approx(4 * n * (1 - 1 / 32) / GIB)
    assert once.optimizer_step_gb == every.optimizer_step_gb  # reduced and sharded by then
    plain, deferred = (micro_batch_time(args, 32, 2, 2048, "full", reductions_per_micro_batch=r) for r in (1, 0.25))
    assert (plain.communication_gb - deferred.communication_gb) * 1e9 == pytest.approx(4 * n * 0.75 * 31 / 32)
    cfg = load_config("let_7b", ["dry_run_world_size=32", "gradient_accumulation_steps=4",
                                 "fsdp.reduce_every_micro_batch=false"])
    report = dry_run(cfg, with_teacher=True)
    assert report["memory_per_gpu_gb"]["accumulated_gradients"] == pytest.approx(4 * n / GIB, rel=0.01)


def test_a_replicate_degree_that_does_not_divide_the_world_is_named_before_any_data():
    """It used to be found when the device mesh was built, after the corpus was prepared
    (hours at scale); fsdp_layout, which setup calls before the data, refuses it now, and
    so does the dry run for the world size it plans."""
    from letrecipes.components import parallel
    from letrecipes.components.registry import ComponentError

    assert parallel.fsdp_layout({"replicate_degree": 2}, 4) == (True, 2)
    assert parallel.fsdp_layout({"replicate_degree": 2}, 1) == (False, 1)  # no FSDP2, nothing to replicate
    with pytest.raises(ComponentError, match=r"fsdp.replicate_degree=2 does not divide the 3 processes"):
        parallel.fsdp_layout({"replicate_degree": 2}, 3)
    with pytest.raises(ComponentError, match=r"fsdp.replicate_degree=3 does not divide the 32 processes"):
        dry_run(load_config("let_7b", ["dry_run_world_size=32", "fsdp.replicate_degree=3"]), with_teacher=True)


def test_the_traffic_goes_over_the_link_it_uses_and_hsdp_is_weighed_for_a_multi_node_run(capsys):
    """The cost model used to price every byte at the network's rate: one 8-GPU node's
    NVLink traffic, and HSDP's all-gathers inside a node, as if they crossed nodes. Now a
    shard group inside a node runs at dry_run_intra_node_gbps, and HSDP's all-reduce across
    replicas (once per step) is what crosses nodes."""
    from letrecipes.components.estimate import block_params, micro_batch_time, total_params

    args = _student_args()
    n = total_params(args)
    gathered = 2 * n + 2 * (n - 2 * args.vocab_size * args.embed_dim - args.embed_dim - block_params(args))
    one_node = micro_batch_time(args, 8, 2, 2048, "full")
    assert one_node.inter_node_gb == 0
    assert one_node.intra_node_gb * 1e9 == pytest.approx((gathered + 4 * n) * 7 / 8)
    assert one_node.communication_s == pytest.approx(one_node.intra_node_gb * 8 / 3600)
    plain = micro_batch_time(args, 32, 2, 2048, "full", gradient_accumulation_steps=8)
    assert plain.intra_node_gb == 0 and plain.inter_node_gb * 1e9 == pytest.approx((gathered + 4 * n) * 31 / 32)
    hsdp = micro_batch_time(args, 32, 2, 2048, "full", replicate_degree=4, gradient_accumulation_steps=8)
    assert hsdp.shard_group == 8 and hsdp.intra_node_gb == pytest.approx(one_node.intra_node_gb)
    # a ring all-reduce of each rank's fp32 gradient shard (4 N / 8 bytes) over 4 replicas, once per 8 micro-batches
    assert hsdp.inter_node_gb * 1e9 == pytest.approx(2 * 3 / 4 * 4 * n / 8 / 8)
    assert hsdp.communication_s == pytest.approx(max(hsdp.intra_node_s, hsdp.inter_node_s))
    assert plain.communication_bound and not hsdp.communication_bound
    # the dry run of the plain layout names the HSDP one, with its traffic and its memory
    report = dry_run(load_config("let_7b", ["dry_run_world_size=32", "batch_size=2", "gradient_accumulation_steps=8"]),
                     with_teacher=True)
    out = capsys.readouterr().out
    assert "fsdp.replicate_degree=4 (HSDP, one replica a node" in out
    assert report["micro_batch_time"]["with_hsdp"]["communication_s"] == pytest.approx(hsdp.communication_s)
    as_hsdp = dry_run(load_config("let_7b", ["dry_run_world_size=32", "batch_size=2", "gradient_accumulation_steps=8",
                                             "fsdp.replicate_degree=4"]), with_teacher=True)
    assert not as_hsdp["micro_batch_time"]["communication_bound"]
    assert as_hsdp["memory_per_gpu_gb"]["total"] == report["micro_batch_time"]["with_hsdp"]["memory_per_gpu_gb"]
    assert "HSDP: 4 replicas of a shard group of 8" in capsys.readouterr().out


def test_the_dry_run_says_whether_a_gpu_holds_the_run_and_the_smallest_world_size_that_does(capsys):
    """It printed 125.6 GiB per GPU for let_7b in one process and called the config
    compute-bound, without a word that no 80 GB GPU holds that."""
    from letrecipes._dry_run import _teacher_args, config_memory
    from letrecipes.components.estimate import USABLE_SHARE

    usable = USABLE_SHARE * 79.6
    one = dry_run(load_config("let_7b"), with_teacher=True)
    assert one["world_size"] == 1 and one["memory_per_gpu_gb"]["total"] > usable
    fit = one["fit"]
    assert not fit["fits"] and fit["usable_gib"] == pytest.approx(usable)
    # the smallest layout that fits, where the one below it does not (2 GPUs: within 90% of 79.6 GiB, too tight)
    cfg = load_config("let_7b")
    teacher = _teacher_args(cfg, int(cfg.data.seq_len))
    at = {world: config_memory(cfg, _student_args(), world, teacher).total_gb for world in (2, 4)}
    assert fit["smallest_world_size"] == 4 and at[2] > usable >= at[4] == pytest.approx(fit["memory_at_smallest_gib"])
    out = capsys.readouterr().out
    assert "WARNING: does not fit a GPU of 79.6 GiB (dry_run_gpu_memory_gib" in out
    assert "Fix: FSDP2 over 4 GPUs or more" in out and "dry_run_world_size=4 to see it" in out
    assert dry_run(load_config("let_7b", ["dry_run_world_size=8"]), with_teacher=True)["fit"]["fits"]
    assert "fits a GPU of 79.6 GiB" in capsys.readouterr().out
    # an H200 holds it in one process; the key is the GPU's memory
    assert dry_run(load_config("let_7b", ["dry_run_gpu_memory_gib=141"]), with_teacher=True)["fit"]["fits"]
    # fsdp off on 8 GPUs: sharding over those same 8 is the fix
    off = dry_run(load_config("let_7b", ["dry_run_world_size=8", "fsdp.enabled=false"]), with_teacher=True)["fit"]
    assert not off["fits"] and off["smallest_world_size"] == 8
    assert "Fix: fsdp.enabled=auto and FSDP2 over 8 GPUs" in capsys.readouterr().out
    # what no number of GPUs divides: activations of 64 x 2048 tokens without checkpointing
    huge = dry_run(load_config("let_7b", ["batch_size=64", "activation_checkpointing.mode=none"]),
                   with_teacher=True)["fit"]
    assert huge["smallest_world_size"] is None and huge["unsharded_gib"] > usable
    assert "No world size up to 2048 fits" in capsys.readouterr().out
    # under HSDP only world sizes the replicate degree divides are laid out
    from letrecipes._dry_run import world_sizes

    assert list(world_sizes(8, 1))[:6] == [1, 2, 4, 8, 16, 24] and list(world_sizes(8, 3))[:2] == [24, 48]


def test_the_gpus_memory_for_the_dry_run_is_a_checked_key():
    from letrecipes._schema import validate

    with pytest.raises(Exception, match="dry_run_gpu_memory_gib"):
        validate(load_config("let_7b", ["dry_run_gpu_memory_gib=0"]), with_teacher=False)


def test_the_dry_run_gives_the_whole_runs_length_at_its_rates(capsys):
    """Each micro-batch takes the longer of its compute (plus the teacher's forward while the
    teacher runs) and its traffic; a step is gradient_accumulation_steps of them."""
    report = dry_run(load_config("let_7b", ["dry_run_world_size=32", "max_steps=1000", "alignment.schedule.stop=0.25"]),
                     with_teacher=True)
    run, t = report["run_time"], report["micro_batch_time"]
    teacher_s = report["teacher_forward_flops_per_token"] * 8 * 2048 / (989e12 * 0.4)
    assert run["steps_with_teacher"] == 250 and run["tokens_per_step"] == 32 * 8 * 2048 * 2
    assert run["step_with_teacher_s"] == pytest.approx(2 * max(t["compute_s"] + teacher_s, t["communication_s"]))
    assert run["seconds"] == pytest.approx(250 * run["step_with_teacher_s"] + 750 * 2 * t["compute_s"])
    assert run["gpu_hours"] == pytest.approx(run["seconds"] * 32 / 3600)
    assert "the run at these rates: 1,000 steps x 1,048,576 tokens (1.05B tokens) in about 1h22m34s on 32 GPU(s)" \
        in capsys.readouterr().out
    # traffic-bound micro-batches set the pace; pretraining has no teacher steps
    slow = dry_run(load_config("pretrain_7b", ["dry_run_world_size=32", "batch_size=2",
                                               "gradient_accumulation_steps=8"]), with_teacher=False)
    assert slow["micro_batch_time"]["communication_bound"] and slow["run_time"]["steps_with_teacher"] == 0
    assert slow["run_time"]["step_s"] == pytest.approx(8 * slow["micro_batch_time"]["communication_s"])
