"""Teachers of the families letrecipes does not build (Gemma, Phi-3), run by transformers.

They stopped the run before ("architecture ['GemmaForCausalLM'] is not supported"); the
paper's claim is that LET needs no architectural link between teacher and student, so
any causal language model transformers implements now guides a run, and what such a
teacher cannot do (be sharded, exported, start a student) is one error line each.
"""

import json
import shutil
import sys

import pytest
import torch

from letrecipes.components.errors import LetRecipesError
from letrecipes.components.teachers import TeacherError, describe_teacher, load_teacher
from letrecipes import let_pretrain
from letrecipes.components.metrics import read_metrics
from tests.launch import needs_compile
from tests.test_recipes import expect_setup_error, run_let

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e '.[test]')")


def _gemma(vocab_size):
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64))


def _phi3(vocab_size):
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False))


def _bloom(vocab_size):  # ALiBi: no position table, so its config.json states no context
    return transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=vocab_size, hidden_size=32, n_layer=2,
                                                                  n_head=2))


def _saved(build, folder, tokenizer_path):
    from tokenizers import Tokenizer

    torch.manual_seed(0)
    model = build(Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()).eval()
    model.save_pretrained(folder)
    shutil.copy(tokenizer_path, folder / "tokenizer.json")
    return model


def _same_outputs(teacher, reference, depth, use_cache=None):
    """The teacher's hidden states (every layer) and logits against the transformers model's own."""
    tokens = torch.randint(0, teacher.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=tokens, output_hidden_states=True,
                             **({} if use_cache is None else {"use_cache": use_cache}))
    states = teacher.hidden_states(tokens, range(depth + 1))
    for layer in range(depth + 1):  # the last after the final norm, as the project's convention has it
        torch.testing.assert_close(states[layer], expected.hidden_states[layer], msg=f"layer {layer}")
    torch.testing.assert_close(teacher.logits(tokens), expected.logits)
    return expected


@pytest.mark.parametrize("build, depth, context", [(_gemma, 3, 64), (_phi3, 2, 64), (_bloom, 2, None)],
                         ids=["gemma", "phi3", "bloom"])
def test_hidden_states_and_logits_are_transformers_own(build, depth, context, tokenizer_path, tmp_path):
    reference = _saved(build, tmp_path, tokenizer_path)
    teacher = load_teacher({"path": str(tmp_path), "dtype": "fp32"})
    _same_outputs(teacher, reference, depth)
    assert (teacher.depth, teacher.width, teacher.context, len(teacher.blocks)) == (depth, 32, context, depth)
    assert "run by transformers" in teacher.source and not any(p.requires_grad for p in teacher.parameters())
    described = describe_teacher({"path": str(tmp_path)})
    assert (described.num_layers, described.embed_dim, described.vocab_size) == (depth, 32, teacher.vocab_size)


@needs_compile
def test_a_gemma_teacher_guides_a_compiled_let_run_and_what_it_cannot_do_is_one_line_each(
        let_overrides, tokenizer_path, tmp_path, capsys):
    teacher = tmp_path / "gemma"
    _saved(_gemma, teacher, tokenizer_path)
    common = [*let_overrides, f"teacher.path={teacher}", "max_steps=3", "alignment.schedule._component_=linear",
              "alignment.schedule.stop=3"]
    run_let(*common, f"output_dir={tmp_path / 'run'}", "teacher.compile=true")
    out = capsys.readouterr().out
    assert f"teacher: {teacher} (GemmaForCausalLM, run by transformers)" in out and "3 blocks, width 32" in out
    aligned = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "align_loss" in r]
    assert len(aligned) >= 2 and all(abs(r["align_loss"]) > 0 for r in aligned)
    let_pretrain.recipe_main(["--config", "let_tiny", *common, f"output_dir={tmp_path / 'dry'}", "dry_run=true"])
    bloom = tmp_path / "bloom"  # a teacher that states no context reads any data.seq_len (was: "0 tokens")
    _saved(_bloom, bloom, tokenizer_path)
    run_let(*common, f"teacher.path={bloom}", f"output_dir={tmp_path / 'bloom_run'}", "max_steps=1")
    assert "teacher forward FLOPs/token" in capsys.readouterr().out

    cache = tmp_path / "cache"
    for overrides, says in [
        (["teacher.placement=sharded", "fsdp.enabled=true"], "teacher.placement=sharded builds the teacher as "
                                                             "letrecipes' own decoder"),
        ([f"init_from={teacher}"], "is a model of a family transformers runs; this run's student is a llama model"),
    ]:
        expect_setup_error(run_let, *common, f"output_dir={tmp_path / 'refused'}", f"data.cache_dir={cache}",
                           *overrides, match=says)
    assert not cache.exists() and not (tmp_path / "refused").exists()
    from letrecipes.cli import main

    with pytest.raises(SystemExit) as err:
        main(["export", str(teacher), str(tmp_path / "out")])
    assert "is a Hugging Face folder already (GemmaForCausalLM" in str(err.value.code)
    assert not (tmp_path / "out").exists()


def test_a_model_with_code_of_its_own_or_without_transformers_is_one_line(tokenizer_path, tmp_path, monkeypatch):
    _saved(_phi3, tmp_path, tokenizer_path)
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Phi3"}}))
    with pytest.raises(TeacherError, match=r"comes with code of its own \(auto_map\), and letrecipes never runs"):
        load_teacher({"path": str(tmp_path), "dtype": "fp32"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(TeacherError, match="run by transformers, which is not installed here. Fix: pip install"):
        load_teacher({"path": str(tmp_path), "dtype": "fp32"})


@pytest.mark.parametrize("version", ["4.57.6", "5.16.1", "4.46.0.dev0"])
def test_a_transformers_older_than_the_loaders_read_is_one_line_before_the_corpus(
        version, let_overrides, tokenizer_path, tmp_path, monkeypatch):
    """With transformers 4.57 installed, 19 of this file's tests failed in assorted ways (tracebacks,
    "its list of blocks was not found. Fix: teacher.compile=false", a Qwen2.5-VL release "not a
    causal language model"); with 5.0-5.16 every GGUF file of these families failed to load
    (their folders load)."""
    _saved(_phi3, tmp_path / "phi3", tokenizer_path)
    gguf_file = tmp_path / "gemma2.gguf"
    _gguf_of(_gemma2, "gemma2", tokenizer_path, gguf_file)
    # the module `import transformers` gives now (transformers puts another object in sys.modules as it loads)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    folder_says = f"a teacher run by transformers needs transformers 5.0 or later; {version} is installed"
    for path, says in ((tmp_path / "phi3", folder_says if version < "5" else None),
                       (gguf_file, f"a GGUF file run by transformers needs transformers 5.17 or later; {version} is "
                                   "installed")):
        for read in (lambda: describe_teacher({"path": str(path)}),
                     lambda: load_teacher({"path": str(path), "dtype": "fp32", "tokenizer_dir": str(tmp_path / "t")})):
            if says is None:  # a folder under 5.16: read
                read()
                continue
            with pytest.raises(TeacherError, match=rf"^teacher\.path: {path}: {says}.* Fix: pip install "):
                read()
    if version < "5":
        cache = tmp_path / "cache"
        expect_setup_error(run_let, *let_overrides, f"teacher.path={tmp_path / 'phi3'}", f"data.cache_dir={cache}",
                           f"output_dir={tmp_path / 'run'}", match=folder_says)
        assert not cache.exists() and not (tmp_path / "run").exists()


def test_the_eval_recipe_scores_such_a_folder_and_names_a_tokenizer_transformers_cannot_use(tokenizer_path, tmp_path):
    """A folder with a bare tokenizer.json (no tokenizer_config.json) is read by AutoTokenizer as
    the family's own tokenizer class: Gemma's wants `<unk>`, and a choice's text ended in the
    tokenizers library's "Exception: Unk token `<unk>` not found in the vocabulary" traceback."""
    from letrecipes import eval as eval_recipe
    from letrecipes.components.evaluation import Item, write_task

    folder = tmp_path / "gemma"
    _saved(_gemma, folder, tokenizer_path)
    task = write_task(tmp_path / "hand_made.jsonl", [Item("To be, or not to", [" be", " cheese"], 0)] * 2)
    common = ["--config", "eval", f"checkpoint={folder}", f"tasks=[{task}]", "contamination=null", "device=cpu"]
    with pytest.raises(SystemExit) as err:
        eval_recipe.recipe_main([*common, f"output={tmp_path / 'refused.json'}"])
    assert str(err.value.code).startswith("error: checkpoint: the tokenizer of ") and "tokenizer_config.json" in \
        str(err.value.code) and "Fix: " in str(err.value.code)
    eval_recipe.recipe_main([*common, f"tokenizer_path={folder / 'tokenizer.json'}", f"output={tmp_path / 's.json'}"])
    assert json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_a_config_of_other_sizes_than_its_weights_is_named_before_transformers_allocates(weights, tokenizer_path,
                                                                                         tmp_path):
    """transformers builds the model its config.json describes, then finds the weights do not
    fit: with `vocab_size: 1000000000` that build took all of this machine's 24 GB first. The
    config is now checked against the weights' headers on the meta device (a PyTorch file's
    too, loaded there: it was not checked before 2026-12-07)."""
    model = _saved(_gemma, tmp_path, tokenizer_path)
    if weights.endswith(".bin"):  # an older release's layout
        (tmp_path / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / weights)
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 4096}))
    with pytest.raises(LetRecipesError, match=rf"^teacher\.path: tensor 'model\.embed_tokens\.weight' in .*{weights}' "
                                              r"has shape \(\d+, 32\), but .* gives it \(4096, 32\): the config and "
                                              r"the weights"):
        load_teacher({"path": str(tmp_path), "dtype": "fp32"})


def test_a_teacher_that_computes_nan_is_named_at_load(tokenizer_path, tmp_path):
    """Checked with the two tokens that count its hidden states: a damaged weight (or a config
    value transformers takes and computes NaN from) was found at the first log step."""
    model = _saved(_gemma, tmp_path, tokenizer_path)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(TeacherError, match=r"its hidden state 3 is not finite on two tokens \(NaN or inf\).* Fix: "):
        load_teacher({"path": str(tmp_path), "dtype": "fp32"})
    _saved(_phi3, tmp_path / "phi3", tokenizer_path)  # a value transformers builds with and torch refuses in forward
    config = json.loads((tmp_path / "phi3" / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "phi3" / "config.json").write_text(json.dumps({**config, "resid_pdrop": float("nan")}))
    with pytest.raises(TeacherError, match=r"the model does not run on two tokens \(RuntimeError: dropout probability"):
        load_teacher({"path": str(tmp_path / "phi3"), "dtype": "fp32"})


def test_a_config_json_changed_at_random_loads_or_ends_in_one_error(tokenizer_path, tmp_path):
    """As for the families built here (test_hf_teachers.py), for folders transformers runs: one
    value of the wrong kind, a key gone or a number scaled loads, or ends in one TeacherError
    (a dropout probability of NaN was torch's RuntimeError from the first forward; an empty
    ``architectures`` an IndexError; 10**9 blocks never finished)."""
    import random

    from tests.damage import changed_json

    rng = random.Random(20261207)
    outcomes = {"loaded": 0, "error": 0}
    for build in (_phi3, _gemma3_vision):
        folder = tmp_path / build.__name__
        _saved(build, folder, tokenizer_path)
        original = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        for _ in range(60):
            config, where, how = changed_json(original, rng)
            (folder / "config.json").write_text(json.dumps(config))
            try:
                load_teacher({"path": str(folder), "dtype": "fp32"})
                outcomes["loaded"] += 1
            except LetRecipesError:
                outcomes["error"] += 1
    assert outcomes["loaded"] > 20 and outcomes["error"] > 20, outcomes


# ---------------------------------------------------------- families built here, with what the decoder lacks
_SMALL = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64)


@pytest.mark.parametrize("build, lacking", [
    (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_SMALL, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})), "rope scaling type 'yarn'"),
    (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL, mlp_bias=True)), "mlp_bias=true"),
    (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(  # opt-350m's layout: post-LN, projected embeddings
        vocab_size=512, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, do_layer_norm_before=False, word_embed_proj_dim=16)), "post-LayerNorm OPT"),
    (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=64, scale_attn_by_inverse_layer_idx=True,
        bos_token_id=0, eos_token_id=0)), "scale_attn_by_inverse_layer_idx=true"),
], ids=["qwen2-yarn", "llama-mlp-bias", "opt-350m", "gpt2-inverse-layer-scaling"])
def test_a_family_built_here_with_a_feature_its_decoder_lacks_is_run_by_transformers(build, lacking, tokenizer_path,
                                                                                     tmp_path):
    """Each was "... is not supported by this loader" (a yarn entry in a Qwen2.5 config.json,
    opt-350m): transformers implements them, and now runs them, the log saying why."""
    torch.manual_seed(0)
    reference = build().eval()
    reference.save_pretrained(tmp_path)
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.json")
    teacher = load_teacher({"path": str(tmp_path), "dtype": "fp32"})
    expected = _same_outputs(teacher, reference, 2)
    assert f"{type(reference).__name__}, run by transformers: {lacking}" in teacher.source
    assert teacher.source.endswith("is not built here)")
    assert teacher.layer_widths == [state.shape[-1] for state in expected.hidden_states]
    config = json.loads((tmp_path / "config.json").read_text())  # named by model_type alone: an IndexError before
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": []}))
    assert f"run by transformers: {lacking}" in load_teacher({"path": str(tmp_path), "dtype": "fp32"}).source


def test_a_teacher_layer_of_another_width_than_the_last_is_one_line_before_training(let_overrides, tokenizer_path,
                                                                                    tmp_path):
    """OPT-350m projects its last hidden state (512 of its 1,024): a middle teacher layer was a
    shape error inside the first step."""
    torch.manual_seed(0)
    transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=512, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, do_layer_norm_before=False, word_embed_proj_dim=16)).save_pretrained(tmp_path / "t")
    shutil.copy(tokenizer_path, tmp_path / "t" / "tokenizer.json")
    expect_setup_error(run_let, *let_overrides, f"teacher.path={tmp_path / 't'}", "alignment.layer_map=M2E",
                       f"output_dir={tmp_path / 'run'}", match="alignment: teacher layer 1 of ")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("build", [
    lambda: transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=512, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)),
    lambda: transformers.RwkvForCausalLM(transformers.RwkvConfig(
        vocab_size=512, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=64,
        context_length=64)),
], ids=["mamba", "rwkv"])
def test_an_attention_free_teacher_is_run_by_transformers(build, tokenizer_path, tmp_path):
    """Mamba and RWKV state no attention heads: "MambaForCausalLM without num_attention_heads"."""
    torch.manual_seed(0)
    reference = build().eval()
    reference.save_pretrained(tmp_path)
    shutil.copy(tokenizer_path, tmp_path / "tokenizer.json")
    _same_outputs(load_teacher({"path": str(tmp_path), "dtype": "fp32"}), reference, 2, use_cache=False)
    described = describe_teacher({"path": str(tmp_path)})
    assert (described.num_layers, described.embed_dim, described.num_heads) == (2, 32, 1)


def test_a_mixture_of_experts_teacher_is_counted_whole_and_an_absurd_depth_is_one_line(tokenizer_path, tmp_path):
    """The dry run's shape describes one dense block: a mixture of experts was counted with one
    expert's MLP (OLMoE-1B-7B as 0.58B of its 6.92B), its memory estimate that much low. Its
    parameters are now counted on the meta device. And a config of 10**9 blocks, which
    transformers builds one by one even there, never finished: now one line."""
    from letrecipes.components.estimate import total_params

    torch.manual_seed(0)
    reference = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **_SMALL, num_local_experts=4, num_experts_per_tok=2)).eval()
    reference.save_pretrained(tmp_path / "moe")
    shutil.copy(tokenizer_path, tmp_path / "moe" / "tokenizer.json")
    whole = sum(p.numel() for p in reference.parameters())
    described = describe_teacher({"path": str(tmp_path / "moe")})
    assert total_params(described) == described.stated_params == whole
    assert described.intermediate_dim == 2 * 64  # for the FLOPs: the two experts a token runs
    teacher = load_teacher({"path": str(tmp_path / "moe"), "dtype": "fp32"})
    assert total_params(teacher.model.model_args) == whole
    _same_outputs(teacher, reference, 2)
    config = json.loads((tmp_path / "moe" / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "moe" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
    with pytest.raises(TeacherError, match=r"1,000,000,000 blocks \(num_hidden_layers\) is past the 4,096"):
        load_teacher({"path": str(tmp_path / "moe"), "dtype": "fp32"})


@pytest.mark.parametrize("family, dense", [("Qwen2Moe", dict(mlp_only_layers=[0], decoder_sparse_step=2)),
                                           ("Qwen3Moe", dict(mlp_only_layers=[1, 4])),
                                           ("DeepseekV3", dict(first_k_dense_replace=2)),
                                           ("DeepseekV2", dict(first_k_dense_replace=1))])
def test_a_mixture_of_experts_with_dense_blocks_is_costed_by_the_blocks_it_has(family, dense):
    """The dry run's FLOPs took every block of a mixture as one of experts: DeepSeek's first
    dense blocks, Qwen-MoE's mlp_only_layers and decoder_sparse_step were costed as sparse.
    The blocks counted sparse are those transformers builds with experts."""
    from letrecipes.components.transformers_teacher import describe, moe_blocks

    config = getattr(transformers, f"{family}Config")(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=100, num_experts_per_tok=2, **dense)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    built = sum(1 for block in model.model.layers if any("experts" in name for name, _ in block.mlp.named_modules()))
    args = config.to_dict()
    assert moe_blocks(args, 6) == built < 6
    shared = args.get("shared_expert_intermediate_size") or 24 * (args.get("n_shared_experts") or 0)
    assert describe(args, "config.json").intermediate_dim == round((built * (2 * 24 + shared) + (6 - built) * 64) / 6)


# ---------------------------------------------------------- vision-language releases
_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=64)


def _gemma3_vision(vocab_size):  # Gemma 3 from 4B up is released as this class only
    return transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=dict(vocab_size=vocab_size, head_dim=16, sliding_window=16, **_TEXT),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=vocab_size - 1, boi_token_index=vocab_size - 3,
        eoi_token_index=vocab_size - 2))


def _qwen2_5_vl(vocab_size):  # positions of three sections (mrope); its vision encoder is `visual`
    return transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=0, eos_token_id=0, **_TEXT),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        image_token_id=vocab_size - 1, video_token_id=vocab_size - 2, vision_start_token_id=vocab_size - 3))


def _mistral3(vocab_size):  # Mistral Small 3.1: a text model of a family letrecipes builds, inside a VLM's class
    return transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=vocab_size, head_dim=16, **_TEXT),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14, head_dim=8),
        image_token_index=vocab_size - 1))


@pytest.mark.parametrize("build", [_gemma3_vision, _qwen2_5_vl, _mistral3], ids=["gemma3", "qwen2_5_vl", "mistral3"])
def test_a_vision_language_release_teaches_with_its_language_model_alone(build, tokenizer_path, tmp_path):
    """Such a release was "architecture ['Gemma3ForConditionalGeneration'] is not a causal
    language model". Its language model is now the teacher, run through the model's own forward
    on text (so whatever the family does after the head is kept), the vision encoder freed."""
    reference = _saved(build, tmp_path, tokenizer_path)
    vision = sum(p.numel() for child in reference.model.children() if child is not reference.get_decoder()
                 for p in child.parameters())
    text_only = sum(p.numel() for p in reference.parameters()) - vision
    teacher = load_teacher({"path": str(tmp_path), "dtype": "fp32"})
    _same_outputs(teacher, reference, 3, use_cache=False)
    assert (teacher.depth, teacher.width, len(teacher.blocks)) == (3, 32, 3)
    assert sum(p.numel() for p in teacher.parameters()) == text_only  # nothing of the vision encoder is held
    assert f"{type(reference).__name__}'s language model, run by transformers" in teacher.source
    described = describe_teacher({"path": str(tmp_path)})
    assert (described.num_layers, described.embed_dim, described.vocab_size) == (3, 32, teacher.vocab_size)
    config = json.loads((tmp_path / "config.json").read_text())  # the config-vs-weights check reads the class too
    config["text_config"]["vocab_size"] = 4096
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LetRecipesError, match=r"^teacher\.path: tensor '.*(embed_tokens|lm_head)\.weight' in .* has "
                                              r"shape \(\d+, 32\), but .* gives it \(4096, 32\)"):
        load_teacher({"path": str(tmp_path), "dtype": "fp32"})


def test_a_vision_language_teacher_guides_a_let_run_and_one_that_skips_blocks_on_text_is_one_line(
        let_overrides, tokenizer_path, tmp_path, capsys):
    teacher = tmp_path / "gemma3"
    _saved(_gemma3_vision, teacher, tokenizer_path)
    run_let(*let_overrides, f"teacher.path={teacher}", "max_steps=2", f"output_dir={tmp_path / 'run'}")
    assert "(Gemma3ForConditionalGeneration's language model, run by transformers; " in capsys.readouterr().out
    assert any("align_loss" in r for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))
    # Llama 3.2 Vision's text model holds cross-attention blocks that text skips: fewer hidden states than blocks
    mllama = tmp_path / "mllama"
    _saved(lambda vocab_size: transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(
        text_config=dict(vocab_size=vocab_size, cross_attention_layers=[1], pad_token_id=0, bos_token_id=0,
                         eos_token_id=0, **_TEXT),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_global_layers=1,
                           attention_heads=2, image_size=28, patch_size=14, vision_output_dim=32,
                           intermediate_layers_indices=[0]),
        image_token_index=vocab_size - 1)), mllama, tokenizer_path)
    with pytest.raises(TeacherError, match=r"the model returns 3 hidden states for its 3 blocks on text, not one per "
                                           r"block and the embeddings'.* Fix: "):
        load_teacher({"path": str(mllama), "dtype": "fp32"})


def test_the_eval_recipe_names_a_vision_language_folder_lm_evals_hf_model_cannot_load(tokenizer_path, tmp_path):
    """lm-eval loads with AutoModelForCausalLM, which has no class for Qwen2.5-VL: that was
    transformers' ValueError and its list of 200 configuration classes, from inside lm-eval."""
    from letrecipes import eval as eval_recipe
    from letrecipes.components.evaluation import Item, write_task

    _saved(_qwen2_5_vl, tmp_path / "vl", tokenizer_path)
    task = write_task(tmp_path / "hand_made.jsonl", [Item("To be, or not to", [" be", " cheese"], 0)] * 2)
    with pytest.raises(SystemExit) as err:
        eval_recipe.recipe_main(["--config", "eval", f"checkpoint={tmp_path / 'vl'}", f"tasks=[{task}]",
                                 "contamination=null", "device=cpu", f"output={tmp_path / 's.json'}"])
    assert str(err.value.code).startswith("error: checkpoint: ") and "is a Qwen2_5_VLForConditionalGeneration, " \
        "which lm-eval's hf model cannot load" in str(err.value.code) and "hf-multimodal" in str(err.value.code)
    assert not (tmp_path / "s.json").exists()


def test_a_config_json_that_leaves_out_its_defaults_is_read_with_transformers_defaults(tmp_path):
    """Gemma 3 4B's config.json (as released) names its text model's width and depth and leaves
    out its heads, KV heads and vocabulary: it was "without num_attention_heads, vocab_size"."""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "image_token_index": 262144,
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "vision_use_head": False}}))
    (tmp_path / "model.safetensors").write_bytes(b"")  # describe reads no weights
    args = describe_teacher({"path": str(tmp_path)})
    assert (args.num_layers, args.embed_dim, args.num_heads, args.num_kv_heads, args.head_dim, args.vocab_size) == \
        (34, 2560, 8, 4, 256, 262208)


# ---------------------------------------------------------- GGUF files of these families
def _gemma2(vocab_size):
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=16))


def _qwen3moe(vocab_size):  # expert widths other than Qwen3MoeConfig's default (768): read from the file
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=64, norm_topk_prob=True))


def _qwen2moe(vocab_size):  # a shared expert beside the routed ones, its own gate
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


TRANSFORMERS_GGUF_NAME = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe"}
# llama.cpp's mixture-of-experts keys: written by its converter, not all read by transformers
EXPERT_KEYS = {"expert_count": "num_experts", "expert_used_count": "num_experts_per_tok",
               "expert_feed_forward_length": "moe_intermediate_size",
               "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}


def _gguf_of(build, arch, tokenizer_path, path, drop=(), extra=(), metadata=()):
    """A random model of ``build`` written as a GGUF file of llama.cpp's ``arch``: its tensors
    under the names transformers' GGUF reader maps (the map read backwards), the metadata keys
    that reader turns into config fields (and llama.cpp's expert keys), and the rewrites of
    llama.cpp's converters that these families have: Gemma's norms stored as 1 + weight,
    Bloom's fused qkv regrouped from head by head into all q, all k, all v, the experts of a
    mixture stacked per block (gate, up, down: [experts, out, in]) and a shared expert's gate
    as a vector. ``drop``, ``extra``, ``metadata``: a damaged file."""
    import gguf
    import numpy as np
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    vocab = json.loads(tokenizer_path.read_text(encoding="utf-8"))["model"]
    model = _saved(build, path.parent / f"{arch}_source", tokenizer_path)
    with torch.no_grad():  # norms and biases away from 1 and 0, so that a rewrite left out shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    config = model.config.to_dict()
    writer = gguf.GGUFWriter(str(path), arch)
    for key, field in {**GGUF_CONFIG_MAPPING[TRANSFORMERS_GGUF_NAME.get(arch, arch)], **EXPERT_KEYS}.items():
        value = (model.config.rope_parameters or {}).get("rope_theta") if field == "rope_theta" else \
            getattr(model.config, field, None) if field else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(f"{arch}.{key}", value)
    for key, value in metadata:
        writer.add_uint32(key, value)
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["merges"]])
    writer.add_pad_token_id(0)
    names = {hf: name for name, hf in get_gguf_hf_weights_map(model, TENSOR_PROCESSORS.get(arch, TensorProcessor)())
             .items()}
    heads, width = config.get("n_head"), config["hidden_size"]
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("mlp.experts.gate_up_proj"):  # transformers fuses the two that llama.cpp stores
            block, half = hf_name.split(".")[2], tensor.shape[1] // 2
            writer.add_tensor(f"blk.{block}.ffn_gate_exps.weight", tensor[:, :half].float().numpy().copy())
            writer.add_tensor(f"blk.{block}.ffn_up_exps.weight", tensor[:, half:].float().numpy().copy())
            continue
        name = names.get(hf_name)
        if hf_name.endswith("mlp.experts.down_proj") or hf_name.endswith("shared_expert_gate.weight"):
            name = f"blk.{hf_name.split('.')[2]}." + ("ffn_down_exps.weight" if "down" in hf_name else
                                                      "ffn_gate_inp_shexp.weight")
            tensor = tensor.reshape(-1) if "shared" in hf_name else tensor
        if name is None or name in drop or (hf_name == "lm_head.weight" and arch != "bloom"
                                            and config["tie_word_embeddings"]):
            continue
        values = tensor.float().numpy().copy()
        if arch.startswith("gemma") and "norm" in name:
            values += 1
        if arch == "bloom" and "attn_qkv" in name:
            grouped = values.reshape(heads, 3, width // heads, *values.shape[1:])
            values = np.concatenate([grouped[:, i].reshape(width, *values.shape[1:]) for i in range(3)])
        writer.add_tensor(name, values)
    for name, values in extra:
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model.eval()


@pytest.mark.parametrize("build, arch", [(_phi3, "phi3"), (_gemma2, "gemma2"), (_bloom, "bloom"),
                                         (_qwen3moe, "qwen3moe"), (_qwen2moe, "qwen2moe")],
                         ids=["phi3", "gemma2", "bloom", "qwen3moe", "qwen2moe"])
def test_a_gguf_file_of_such_a_family_is_read_by_transformers_as_written(build, arch, tokenizer_path, tmp_path):
    """A GGUF teacher of a family not built here was "GGUF architecture 'phi3' is not supported".
    A mixture of experts' experts were "tensors transformers has no place for" (the reader maps
    them without their .weight), and their width (expert_feed_forward_length, not read by
    transformers) its config class's default: "the metadata and the weights are of two models"."""
    from tokenizers import Tokenizer

    path = tmp_path / f"tiny-{arch}.gguf"
    reference = _gguf_of(build, arch, tokenizer_path, path)
    described = describe_teacher({"path": str(path)}, check_weights=True)
    teacher = load_teacher({"path": str(path), "dtype": "fp32", "tokenizer_dir": str(tmp_path / "tok")})
    assert (described.num_layers, described.embed_dim, teacher.depth, teacher.width) == (2, 32, 2, 32)
    assert described.stated_params == sum(p.numel() for p in reference.parameters())  # the dry run's memory
    assert teacher.source == f"{path} (GGUF {arch}, run by transformers)"
    _same_outputs(teacher, reference, 2)
    text = "To be, or not to be: that is the question."
    assert Tokenizer.from_file(str(teacher.tokenizer_path)).encode(text).ids == \
        Tokenizer.from_file(str(tokenizer_path)).encode(text).ids


def test_a_gguf_gemma2_teacher_guides_a_let_run_and_exports_to_a_folder_transformers_reads(
        let_overrides, tokenizer_path, tmp_path):
    from letrecipes.cli import main

    path = tmp_path / "gemma2.gguf"
    reference = _gguf_of(_gemma2, "gemma2", tokenizer_path, path)
    common = [*let_overrides, f"teacher.path={path}", "max_steps=2", "alignment.schedule._component_=linear",
              "alignment.schedule.stop=2"]
    run_let(*common, f"output_dir={tmp_path / 'run'}")
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "align_loss" in r] == [1, 2]
    expect_setup_error(run_let, *common, f"output_dir={tmp_path / 'refused'}", "teacher.placement=sharded",
                       "fsdp.enabled=true", match="teacher.placement=sharded builds the teacher as letrecipes' own")

    main(["export", str(path), str(tmp_path / "out"), "--dtype", "fp32"])
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = torch.randint(0, reference.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, reference(tokens).logits)
    again = load_teacher({"path": str(tmp_path / "out"), "dtype": "fp32"})  # and it is a teacher as it is
    assert again.source == f"{tmp_path / 'out'} (Gemma2ForCausalLM, run by transformers)"


@pytest.mark.parametrize("damage, says", [
    ({"extra": [("rope_factors_long.weight", torch.ones(8).numpy())]},
     r"transformers' GGUF reader has no place in a phi3 model for 1 of its tensors \(rope_factors_long\.weight\)"),
    ({"drop": {"blk.1.ffn_down.weight"}}, r"1 weight\(s\) of the phi3 model its metadata describes are not in the "
                                          r"file \(model\.layers\.1\.mlp\.down_proj\.weight\): transformers would "
                                          r"leave them random"),
    # sizes that would be harmless if the check were ever lost (the fuzzer's 10**9 took all memory)
    ({"metadata": [("phi3.vocab_size", 1024)]}, r"its tensor token_embd\.weight holds 16,384 values, and the phi3 "
                                                r"model its metadata describes gives it 32,768"),
], ids=["a tensor transformers does not read", "a tensor missing", "a vocabulary of another size"])
def test_a_gguf_file_that_is_not_the_model_transformers_would_build_is_one_line(damage, says, tokenizer_path,
                                                                                tmp_path):
    path = tmp_path / "phi3.gguf"
    _gguf_of(_phi3, "phi3", tokenizer_path, path, **damage)
    for read in (lambda: describe_teacher({"path": str(path)}, check_weights=True),
                 lambda: load_teacher({"path": str(path), "dtype": "fp32", "tokenizer_dir": str(tmp_path / "tok")})):
        with pytest.raises(TeacherError, match=rf"^teacher\.path: {path}: {says}.* Fix: "):
            read()
