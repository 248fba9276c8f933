"""Hugging Face teachers against the reference implementation (transformers, test-only).

Each test makes a tiny random model with transformers, saves it in the real on-disk
format, loads it with our loader, and compares every layer's hidden states and the
logits in fp32.
"""

import json
import sys
import random
import re

import pytest
import torch

from letrecipes.components.models import forward_with_hidden
from letrecipes.components.errors import LetRecipesError
from letrecipes.components.estimate import total_params
from letrecipes.components.teachers import TeacherError, describe_teacher, load_teacher
from tests.damage import changed_json

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e '.[test]')")

TINY = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
            max_position_embeddings=64)


def _llama(tie=True, **extra):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **TINY, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=tie, rope_theta=10_000.0, **extra))


def _llama3_scaled():
    return _llama(tie=True, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16})


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **TINY, num_key_value_heads=3, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=1_000_000.0))


def _mistral(window=None):
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        **TINY, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=1_000_000.0,
        sliding_window=window))


def _qwen3():  # head_dim 16 (not 48 / 6): Qwen3-0.6B's heads are wider than hidden / heads too
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **TINY, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=1_000_000.0))


def _opt(tie=True):
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=101, hidden_size=48, ffn_dim=80, num_hidden_layers=3, num_attention_heads=6,
        max_position_embeddings=64, word_embed_proj_dim=48, tie_word_embeddings=tie, dropout=0.0))


def _pythia(parallel=True, act="gelu"):  # Pythia's layout: a quarter of each head turned, attention and MLP in parallel
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
        max_position_embeddings=64, rotary_pct=0.25, rotary_emb_base=10_000, use_parallel_residual=parallel,
        hidden_act=act, layer_norm_eps=1e-5, tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0))


def _gpt2(tie=True, act="gelu_new", inner=None):  # GPT-2's Conv1D layers, fused c_attn, positions from row 0
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=101, n_embd=48, n_layer=3, n_head=6, n_positions=64, n_inner=inner, activation_function=act,
        layer_norm_epsilon=1e-5, tie_word_embeddings=tie))


MODELS = {"llama_tied": _llama, "llama_untied": lambda: _llama(tie=False), "llama3_scaled_rope": _llama3_scaled,
          "qwen2_biases": _qwen2, "opt": _opt, "mistral": _mistral, "mistral_window": lambda: _mistral(window=48),
          "qwen3_qk_norm": _qwen3, "pythia": _pythia, "gpt_neox_sequential_gelu_tanh": lambda: _pythia(False, "gelu_new"),
          "gpt2": _gpt2, "gpt2_untied_exact_gelu_ffn_80": lambda: _gpt2(tie=False, act="gelu", inner=80)}


def _save(model, path, shard=False):
    torch.manual_seed(0)
    with torch.no_grad():  # random init has zero biases and unit norms: perturb them so they are checked
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(path, max_shard_size="40KB" if shard else "5GB")
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hidden_states_and_logits_match_transformers(tmp_path, name):
    torch.manual_seed(0)
    reference = _save(MODELS[name](), tmp_path, shard=name == "llama_untied")
    if name == "llama_untied":
        assert (tmp_path / "model.safetensors.index.json").is_file()
    teacher = load_teacher({"_component_": "auto", "path": str(tmp_path), "dtype": "fp32"})
    tokens = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens, output_hidden_states=True)
        depth = teacher.depth
        hidden, logits = forward_with_hidden(teacher.model, tokens, range(depth + 1), logits=True)
    assert depth == len(expected.hidden_states) - 1 == 3
    for layer in range(depth + 1):
        torch.testing.assert_close(hidden[layer], expected.hidden_states[layer], atol=2e-5, rtol=1e-4,
                                   msg=f"{name}: layer {layer}")
    torch.testing.assert_close(logits, expected.logits, atol=2e-5, rtol=1e-4)
    # The teacher's own early-stopping path gives the same states as the full forward.
    torch.testing.assert_close(teacher.hidden_states(tokens, [1])[1], expected.hidden_states[1], atol=2e-5, rtol=1e-4)
    assert (teacher.width, teacher.vocab_size) == (48, 101)
    assert teacher.context == (48 if name == "mistral_window" else 64)  # the window bounds what it reads exactly
    assert total_params(describe_teacher({"path": str(tmp_path)})) == sum(p.numel() for p in teacher.parameters())  # dry runs count right


def _broken(tmp_path, edit):
    _save(_llama(), tmp_path)
    edit(tmp_path)
    with pytest.raises(TeacherError) as err:
        load_teacher({"_component_": "huggingface", "path": str(tmp_path), "dtype": "fp32"})
    return str(err.value)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_an_architecture_that_is_no_causal_language_model_is_named(tmp_path):
    """(A causal one of another family, Gemma, is run by transformers: test_transformers_teachers.py.)"""
    message = _broken(tmp_path, lambda p: _edit_config(p, architectures=["BertModel"], model_type="bert"))
    assert "BertModel" in message and "config.json" in message and "LlamaForCausalLM" in message
    assert "is not a causal language model" in message and "*ForCausalLM that transformers implements" in message
    # the line begins with its key, whichever reads the config: the loader, or the recipe's check before any step
    assert message.startswith(f"teacher.path: {tmp_path / 'config.json'}: architecture ['BertModel']")
    with pytest.raises(TeacherError, match=r"^teacher\.path: .*config\.json: architecture"):
        describe_teacher({"_component_": "huggingface", "path": str(tmp_path)}, check_weights=True)
    with pytest.raises(TeacherError, match=r"^student\.path: .*config\.json: architecture"):
        load_teacher({"_component_": "huggingface", "path": str(tmp_path), "dtype": "fp32"}, path_key="student.path")


@pytest.mark.parametrize("key, value, says", [
    # (not the billions of the report: were the checks to go, this test must not take the machine with it)
    ("num_hidden_layers", 4096, "4,096 blocks (num_hidden_layers), but the weights hold 3"),
    ("max_position_embeddings", 2**24 + 1, "16,777,217 positions (max_position_embeddings) is past the 16,777,216"),
])
def test_sizes_no_memory_holds_are_compared_before_the_model_is_built(tmp_path, key, value, says):
    """A config.json with a billion blocks or positions (a damaged file, a hand edit) built them
    before any weight was read: std::bad_alloc, or "DefaultCPUAllocator: can't allocate memory:
    you tried to allocate 32000000000 bytes" (the RoPE table), as tracebacks."""
    message = _broken(tmp_path, lambda p: _edit_config(p, **{key: value}))
    assert says in message and "Fix: use the config.json released with these weights" in message
    with pytest.raises(TeacherError, match="teacher.path: "):  # the recipe's check before the corpus says it too
        describe_teacher({"_component_": "huggingface", "path": str(tmp_path)}, check_weights=True)


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    message = _broken(tmp_path, lambda p: _edit_config(p, intermediate_size=96))
    assert "model.safetensors" in message and "mlp" in message and "96" in message


def _quantize_a_layer(path, parts):
    """Replace layer 0's q_proj.weight with the tensors a quantizer writes in its place."""
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    weights.pop("model.layers.0.self_attn.q_proj.weight")
    weights.update({f"model.layers.0.self_attn.q_proj.{name}": tensor for name, tensor in parts.items()})
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


GPTQ_PARTS = {"qweight": torch.zeros(6, 48, dtype=torch.int32), "qzeros": torch.zeros(1, 6, dtype=torch.int32),
              "scales": torch.ones(1, 48, dtype=torch.float16), "g_idx": torch.zeros(48, dtype=torch.int32)}


@pytest.mark.parametrize("edit, says", [
    # transformers' own record of it (GPTQ, AWQ, bitsandbytes, FP8 models on the Hub)
    (lambda p: _edit_config(p, quantization_config={"quant_method": "gptq", "bits": 4}), "(gptq, 4 bits)"),
    (lambda p: _edit_config(p, quantization_config={"load_in_4bit": True}), "(bitsandbytes, 4 bits)"),
    (lambda p: _edit_config(p, compression_config={"format": "float-quantized"}), "(float-quantized)"),
    # AutoGPTQ's own config file beside a config.json that does not say so
    (lambda p: (p / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128})),
     "(quantize_config.json, 4 bits)"),
    # the tensors alone: GPTQ's packed integers, an FP8 weight under the plain name
    (lambda p: _quantize_a_layer(p, GPTQ_PARTS), "tensor 'model.layers.0.self_attn.q_proj.g_idx' (int32, shape (48,))"),
    (lambda p: _quantize_a_layer(p, {"weight": torch.zeros(48, 48, dtype=torch.float8_e4m3fn)}),
     "tensor 'model.layers.0.self_attn.q_proj.weight' (float8_e4m3fn, shape (48, 48))"),
])
def test_a_quantized_checkpoint_is_refused_with_the_way_to_a_full_precision_one(tmp_path, edit, says):
    """A GPTQ/AWQ/bitsandbytes/FP8 folder was "unexpected tensor ... check that config.json
    belongs to these weights", and an FP8 weight under a plain name was cast to float as if
    it were one: a teacher of noise, without a word."""
    message = _broken(tmp_path, edit)
    assert says in message and "quantized" in message and "full-precision model these weights were quantized " \
        "from" in message and "GGUF" in message


def test_a_config_json_cut_short_is_named_as_that(tmp_path):
    def cut(p):
        (p / "config.json").write_text((p / "config.json").read_text(encoding="utf-8")[:120])

    message = _broken(tmp_path, cut)
    assert "config.json' is cut short: its JSON stops inside a value after 120 bytes (an interrupted download or " \
        "copy). Fix: re-download or re-export the model." in message


def test_missing_shard_is_named(tmp_path):
    def drop_a_shard(p):
        index = json.loads((p / "model.safetensors.index.json").read_text(encoding="utf-8"))
        (p / sorted(set(index["weight_map"].values()))[-1]).unlink()

    torch.manual_seed(0)
    _save(_llama(tie=False), tmp_path, shard=True)
    drop_a_shard(tmp_path)
    with pytest.raises(TeacherError, match=r"model-0000\d-of-0000\d.safetensors.*holds no such file"):
        load_teacher({"_component_": "huggingface", "path": str(tmp_path)})


def _remap(index_text, change):
    """The index with its first tensor's shard changed by ``change``."""
    index = json.loads(index_text)
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = change(index["weight_map"][first])
    return json.dumps(index)


def _other_shard(index_text, shard):
    return next(s for s in sorted(set(json.loads(index_text)["weight_map"].values())) if s != shard)


@pytest.mark.parametrize("damage, says", [
    (lambda text: text[:150], "is cut short: its JSON stops inside a value after 150 bytes (an interrupted download "
                              "or copy). Fix: download the index again"),
    (lambda text: '{"metadata": {}}', "not a weight index (needs a 'weight_map')"),
    (lambda text: '{"weight_map": ["model-00001-of-00002.safetensors"]}',
     "its 'weight_map' is not a map of tensor name to shard file (it is ['model-00001"),
    (lambda text: _remap(text, lambda shard: None), "the shard None, which is not the name of a file in the folder"),
    (lambda text: _remap(text, lambda shard: "../" + shard), "which is not the name of a file in the folder"),
    (lambda text: _remap(text, lambda shard: "/etc/passwd"), "the shard '/etc/passwd', which is not the name of a file"),
    (lambda text: _remap(text, lambda shard: "x" * 300), "lists the shard 'xxxxx"),
    (lambda text: _remap(text, lambda shard: _other_shard(text, shard)),
     "which does not hold it. Fix: re-download the shards and their index together."),
], ids=["cut-short", "no-weight-map", "a-list", "not-a-name", "outside", "absolute", "name-too-long", "wrong-shard"])
def test_a_weight_index_cut_short_or_of_another_kind_is_named_as_that(tmp_path, damage, says):
    torch.manual_seed(0)
    _save(_llama(tie=False), tmp_path, shard=True)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(damage(index.read_text(encoding="utf-8")))
    with pytest.raises(TeacherError) as err:
        load_teacher({"_component_": "huggingface", "path": str(tmp_path)})
    assert says in str(err.value), err.value


@pytest.mark.parametrize("files, says", [
    (["tf_model.h5"], "it holds tf_model.h5: TensorFlow weights only. Fix: download the model's PyTorch weights"),
    (["flax_model.msgpack"], "from_flax=True"),
    (["consolidated.00.pth", "params.json"], "it holds consolidated.00.pth: the original release's weights"),
    ([], "no *.safetensors or pytorch_model.bin at all. Fix: copy the model's weight files"),
])
def test_a_folder_with_weights_in_another_layout_says_which_and_the_way_on(tmp_path, files, says):
    def keep_only(p):
        for weights in p.glob("model*.safetensors*"):
            weights.unlink()
        for name in files:
            (p / name).write_bytes(b"\0" * 64)

    assert says in _broken(tmp_path, keep_only)


def test_unsupported_rope_scaling_is_refused_without_transformers(tmp_path, monkeypatch):
    """(With transformers installed, it runs the model: test_transformers_teachers.py.)"""
    monkeypatch.setitem(sys.modules, "transformers", None)
    message = _broken(tmp_path, lambda p: _edit_config(p, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                           "rope_theta": 10000.0}))
    assert "yarn" in message and "config.json" in message
    assert "Fix: pip install transformers (or letrecipes[eval]), which then runs it as a teacher; or, where the " \
           "model was pretrained without it" in message and "lacks rope_scaling" in message


@pytest.mark.parametrize("edit, says", [({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported by this loader. "
                                          "Fix: pip install transformers (or letrecipes[eval]), which then runs it as a "
                                          "teacher; or use a checkpoint of the family without it, or register a "
                                          "teacher loader that builds it (docs/extending.md)."),
                                         ({"intermediate_size": None}, "missing key 'intermediate_size' that a llama "
                                          "config must have. Fix: use the config.json the checkpoint was released with.")])
def test_a_config_the_loader_cannot_map_is_one_error_with_its_fix(tmp_path, edit, says, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # which would run the first (test_transformers_teachers.py)
    def change(path):
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        config.update({k: v for k, v in edit.items() if v is not None})
        for k in [k for k, v in edit.items() if v is None]:
            del config[k]
        (path / "config.json").write_text(json.dumps(config))

    assert says in _broken(tmp_path, change)


@pytest.mark.parametrize("changes, says", [
    ({"hidden_size": "48"}, "hidden_size='48' must be an integer from 1 to 2,147,483,647"),
    ({"num_hidden_layers": -1}, "num_hidden_layers=-1 must be an integer from 1"),
    ({"vocab_size": 2**63}, "vocab_size=9223372036854775808 must be an integer from 1 to 2,147,483,647"),
    ({"rms_norm_eps": None}, "rms_norm_eps=None must be a finite number > 0"),
    ({"architectures": 1}, "architectures=1 must be a list of class names"),
    ({"architectures": [{}]}, "architectures=[{}] must be a list of class names"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings='no' must be true or false"),
    ({"hidden_act": ["silu"]}, "hidden_act=['silu'] must be a name (a string)"),
    ({"rope_scaling": "llama3"}, "rope_scaling='llama3' must be a map of rope settings, or null"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": [8.0], "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64}}, "rope_scaling.factor=[8.0] must be a finite number"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": float("nan")}},
     "rope_parameters.original_max_position_embeddings=nan must be an integer from 1"),
    ({"num_key_value_heads": 4}, "num_attention_heads=6 must be a multiple of num_key_value_heads=4"),
    ({"num_attention_heads": 5, "num_key_value_heads": 5}, "hidden_size=48 must be a multiple of num_attention_heads=5"),
])
def test_a_config_value_of_the_wrong_kind_names_the_config_key(tmp_path, changes, says):
    """A hand-edited or converted config.json: the key named in the teacher's config.json,
    not a TypeError from deep in the loader or an error about the student's model.* keys."""
    message = _broken(tmp_path, lambda p: _edit_config(p, **changes))
    assert "config.json: " + says in message and "Fix: use the config.json the checkpoint was released with" in message
    assert "model.num" not in message


def test_a_config_json_with_a_value_changed_at_random_loads_or_ends_in_one_error(tmp_path):
    """Each family's config.json with one value of the wrong kind, a key gone or a number
    scaled: it loads, or ends in one TeacherError, never another exception (an
    ``architectures`` of 1 was ``'int' object is not iterable``, a ``rope_scaling`` string
    ``'str' object has no attribute 'get'``, a count of 2**63 an overflow in torch.empty)."""
    rng = random.Random(20261206)
    outcomes = {"loaded": 0, "error": 0}
    for name in ("llama3_scaled_rope", "gpt2", "opt", "pythia", "qwen3_qk_norm"):
        folder = tmp_path / name
        _save(MODELS[name](), folder)
        original = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        for _ in range(40):
            config, where, how = changed_json(original, rng)
            (folder / "config.json").write_text(json.dumps(config))
            try:
                load_teacher({"_component_": "auto", "path": str(folder), "dtype": "fp32"})
                outcomes["loaded"] += 1
            except LetRecipesError:
                outcomes["error"] += 1
    assert outcomes["loaded"] > 40 and outcomes["error"] > 40, outcomes


def _to_pytorch_bin(path, shards=1):
    """Rewrite a saved model's safetensors as ``pytorch_model.bin`` (sharded with an index
    when ``shards`` > 1), as older checkpoints ship."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
        file.unlink()
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    names = sorted(tensors)
    if shards == 1:
        torch.save(tensors, path / "pytorch_model.bin")
        return
    weight_map = {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: tensors[n] for n in names[k::shards]}, path / file)
        weight_map.update({n: file for n in names[k::shards]})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_checkpoints_load_like_safetensors(tmp_path, shards):
    """Older checkpoints ship ``pytorch_model.bin`` only: same hidden states as the
    safetensors copy; a pickle that carries code is refused, not run."""
    for name in ("st", "bin"):
        torch.manual_seed(0)  # the same seed: the same weights
        _save(_llama(tie=False), tmp_path / name)
    _to_pytorch_bin(tmp_path / "bin", shards)
    tokens = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    states = [load_teacher({"_component_": "auto", "path": str(tmp_path / name), "dtype": "fp32"}).hidden_states(
        tokens, [1, 3]) for name in ("st", "bin")]
    for layer in (1, 3):
        torch.testing.assert_close(states[1][layer], states[0][layer], atol=0, rtol=0)
    if shards == 1:
        class RunsCode:
            def __reduce__(self):
                return (print, ("this must not run",))

        tensors = torch.load(tmp_path / "bin" / "pytorch_model.bin", weights_only=True)
        torch.save({**tensors, "extra": RunsCode()}, tmp_path / "bin" / "pytorch_model.bin")
        with pytest.raises(TeacherError, match=r"pytorch_model.bin' holds Python objects besides tensors, which are "
                                               r"not loaded \(they could run code\)"):
            load_teacher({"_component_": "auto", "path": str(tmp_path / "bin")})
        (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not a checkpoint")
        with pytest.raises(TeacherError, match=r"cannot read .*pytorch_model.bin"):
            load_teacher({"_component_": "auto", "path": str(tmp_path / "bin")})


def test_a_hub_id_as_teacher_path_gets_the_download_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TeacherError, match=r"teacher.path: nothing at 'meta-llama/Llama-3.2-1B'. It looks like a Hugging "
                                           r"Face Hub model id: .* never downloads. Fix: download it first "
                                           r"\(huggingface-cli download meta-llama/Llama-3.2-1B --local-dir "
                                           r"models/Llama-3.2-1B\) and set teacher.path=models/Llama-3.2-1B."):
        load_teacher({"_component_": "auto", "path": "meta-llama/Llama-3.2-1B"})
    # a relative file path of two parts is no id: no download command made of it
    from letrecipes.components.files import hub_id_hint

    assert hub_id_hint("tok/tokenizer.json", "tokenizer.path") == ""
    assert hub_id_hint("Qwen/Qwen2.5-0.5B", "teacher.path").startswith("It looks like a Hugging Face Hub model id")


def test_a_missing_folder_named_like_a_model_gets_its_download_or_the_cached_copy(tmp_path, monkeypatch):
    """let_7b's teacher.path=/models/Llama-3.2-1B on a machine that lacks it said "Fix: train a
    teacher with `tune run letrecipes/pretrain --config pretrain_tiny`", and pretrain_7b's
    tokenizer.path "the demo trains one": no answer for a model the user brings."""
    from letrecipes.components.tokenizer import Tokenizer

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    models = tmp_path / "models"
    models.mkdir()  # empty: nothing close by to name
    with pytest.raises(TeacherError, match=r"teacher.path: nothing at '.*/models/Llama-3.2-1B'. It is named like the "
                                           r"Hugging Face model meta-llama/Llama-3.2-1B; letrecipes reads local files "
                                           r"only and never downloads. Fix: download it there \(a gated model: accept "
                                           r"its licence on huggingface.co/meta-llama/Llama-3.2-1B and `huggingface-cli "
                                           r"login` first\): huggingface-cli download meta-llama/Llama-3.2-1B "
                                           r"--local-dir .*/models/Llama-3.2-1B; or point teacher.path at your copy.$"):
        load_teacher({"_component_": "auto", "path": str(models / "Llama-3.2-1B")})
    with pytest.raises(LetRecipesError, match=r"no tokenizer file at .*SmolLM2-135M/tokenizer.json'. .* Fix: download it "
                                              r"there: huggingface-cli download HuggingFaceTB/SmolLM2-135M --local-dir "):
        Tokenizer(models / "SmolLM2-135M" / "tokenizer.json")
    # a folder of one's own: no download made up, and no tiny teacher to train either
    with pytest.raises(TeacherError, match=r"nothing at '.*/models/mine'. Fix: point it at a Hugging Face model folder, "
                                           r"a .gguf file or a letrecipes export \(<output_dir>/final\).$"):
        load_teacher({"_component_": "auto", "path": str(models / "mine")})
    # the Hugging Face cache holds one of that name, under whichever organisation: its snapshot is named
    snapshot = tmp_path / "hub" / "models--someone--Qwen2.5-0.5B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").write_text("{}")
    with pytest.raises(TeacherError, match=r"Your Hugging Face cache holds someone/Qwen2.5-0.5B \(letrecipes reads paths "
                                           rf"and never downloads\). Fix: teacher.path={re.escape(str(snapshot))}$"):
        load_teacher({"_component_": "auto", "path": str(models / "Qwen2.5-0.5B")})
    with pytest.raises(LetRecipesError, match=rf"Fix: tokenizer.path={re.escape(str(snapshot / 'tokenizer.json'))}$"):
        Tokenizer(models / "Qwen2.5-0.5B" / "tokenizer.json")


@pytest.mark.parametrize("given, key, expected", [
    ("https://huggingface.co/HuggingFaceTB/SmolLM2-135M", "teacher.path",
     "huggingface-cli download HuggingFaceTB/SmolLM2-135M --local-dir models/SmolLM2-135M) and set "
     "teacher.path=models/SmolLM2-135M."),
    ("https://huggingface.co/datasets/allenai/c4/resolve/main/en/c4-train.00000-of-01024.json.gz", "data.source",
     "huggingface-cli download allenai/c4 en/c4-train.00000-of-01024.json.gz --repo-type dataset --local-dir data/c4) "
     "and set data.source=data/c4/en/c4-train.00000-of-01024.json.gz."),
    ("hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT", "data.source",
     "huggingface-cli download HuggingFaceFW/fineweb-edu --include 'sample/10BT/*' --repo-type dataset --local-dir "
     "data/fineweb-edu) and set data.source=data/fineweb-edu/sample/10BT."),
    ("s3://bucket/c4/en", "data.source", "It is a URL: letrecipes reads local files only and never downloads. Fix: "
     "download it first (aws s3 cp --recursive s3://bucket/c4/en data/) and set data.source to the local copy."),
])
def test_a_url_as_a_path_is_named_with_how_to_download_only_what_it_names(tmp_path, monkeypatch, given, key, expected):
    """A URL where a path belongs (letrecipes never downloads): the error quotes it as written
    and says how to fetch it; for a Hub URL only the file or folder it names, not the whole
    repository (C4 is hundreds of GB)."""
    from letrecipes.components.corpus import DataError, source_files
    from letrecipes.components.tokenizer import Tokenizer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache"))
    if key == "teacher.path":
        with pytest.raises(TeacherError) as err:
            load_teacher({"_component_": "auto", "path": given})
    else:
        with pytest.raises(DataError) as err:
            source_files(given)
    assert f"{given!r}" in str(err.value) and expected in str(err.value)
    with pytest.raises(DataError, match=r"tokenizer.path: no tokenizer file at 'https://huggingface.co/org/tok/"
                                        r"resolve/main/tokenizer.json'.*huggingface-cli download org/tok tokenizer.json"):
        Tokenizer("https://huggingface.co/org/tok/resolve/main/tokenizer.json")


def test_a_file_of_a_model_folder_named_instead_of_the_folder_gets_the_folder(tmp_path):
    _save(_llama(), tmp_path)
    for name in ("model.safetensors", "config.json"):
        with pytest.raises(TeacherError, match=rf"teacher.path: '.*{name}' is one file of a huggingface model; the "
                                               rf"model is the folder that holds it. Fix: teacher.path={tmp_path}$"):
            load_teacher({"_component_": "auto", "path": str(tmp_path / name)})
