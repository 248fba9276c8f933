"""GGUF teachers written here from a random tiny transformers model the way llama.cpp's
converter writes them: qwen2 and qwen3 (q/k rows as Hugging Face has them: llama.cpp turns
these with its NEOX RoPE; the tokenizer's `qwen2` split), and llama with Llama 3's
`llama-bpe` split (q/k rows permuted for llama.cpp's interleaved RoPE); gptneox (Pythia: the
fused qkv regrouped q/k/v, LayerNorm and biases, partial RoPE, parallel residual, the GPT-2
split under llama.cpp's name for Pythia's tokenizer, `olmo`); gpt2 (Conv1D weights stored as
linear ones, learned positions).

Checked against the model the file was written from, and against transformers reading
the same file (its own GGUF reader and tokenizer converter)."""

import importlib.util
import json
import math
import sys

import numpy as np

import pytest
import tokenizers
import torch

from letrecipes.components.export import ExportError, hf_config
from letrecipes.components.models import forward_with_hidden
from letrecipes.components.teachers import load_teacher
from letrecipes.components.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")

VOCAB = 320
TEXT = ("It's 2024: we'LL pay 1234567 dollars, they'd said.\n\n  Indented\tline; naïve café (NFC vs NFD: café).\r\n"
        "Numbers 3.14159 and 42, CAPS'VE, émigré, 東京 and emoji 🙂.")


PRE_TOKENIZER = {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe", "llama31": "llama-bpe", "pythia": "olmo",
                 "pythia_sequential": "olmo", "gpt2": "gpt-2"}
GGUF_ARCH = {"llama31": "llama", "pythia": "gptneox", "pythia_sequential": "gptneox"}
# The splits as llama.cpp defines them, written out here so that the loader's own copy is under test.
SPLITS = {"qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                   r"|\s+(?!\S)|\s+",
          "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                       r"\s*[\r\n]+|\s+(?!\S)|\s+"}


def byte_level_bpe(tmp_path, pre):
    """A small byte-level BPE with the split that ``pre`` names, trained on a few sentences."""
    from tokenizers import Regex, Tokenizer as Tok, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tok(models.BPE())
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    if pre in ("olmo", "gpt-2"):  # GPT-2's and GPT-NeoX-20B's (Pythia's): byte level with GPT-2's own split
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 1, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    numbers = " ".join(str(n) for n in range(100, 400))  # digit merges, which the splits allow differently
    tok.train_from_iterator([TEXT * 3, "the quick brown fox jumps over the lazy dog " * 20, numbers], trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return json.loads(path.read_text(encoding="utf-8"))  # its byte-level alphabet is not ASCII: not the locale's


def hf_model(arch):
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1_000_000.0)
    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=6, n_positions=1024, layer_norm_epsilon=1e-5))  # GPT-2's
        # own context: transformers' GGUF reader sizes the position table from n_ctx, which it does not read back
    elif arch.startswith("pythia"):  # rotary_pct 0.5 of heads of 8: two pairs turned, four features not
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
            max_position_embeddings=64, layer_norm_eps=1e-5, rotary_pct=0.5, rotary_emb_base=10_000,
            use_parallel_residual=arch == "pythia", hidden_act="gelu", tie_word_embeddings=False))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=False))
    elif arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False))
    elif arch == "llama31":  # Llama-3.1+'s scaled RoPE (Llama-3.2-1B, the 7B teacher), bands inside this context
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, tie_word_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))
    else:  # heads of 128, wider than hidden / heads, as in Qwen3-0.6B (and what transformers' GGUF reader assumes)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=128, tie_word_embeddings=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
              "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
              "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def llama_cpp_permute(w, heads):
    """What llama.cpp's converter does to a llama model's q and k rows: each head's halves
    (j, j + d/2), as Hugging Face turns them, become interleaved pairs (2j, 2j + 1)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_factors(config, head_dim):
    """llama.cpp's converter for a llama3-scaled RoPE: one factor per frequency (rope_freqs),
    1 above the high band, the whole factor below the low band, interpolated between."""
    scaling, base = config.rope_parameters, config.rope_parameters["rope_theta"]
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)):
        wavelength = 2 * math.pi / freq
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(model, arch, tokenizer_json, path, split_max_tensors=0, write_vocabulary=None):
    """``split_max_tensors``: as llama.cpp's gguf-split, parts of at most that many tensors
    (<stem>-00001-of-0000N.gguf, ...). ``write_vocabulary(writer)``: the tokenizer metadata,
    in place of ``tokenizer_json``'s byte-level BPE."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH.get(arch, arch), split_max_tensors=split_max_tensors)
    if write_vocabulary is not None:
        write_vocabulary(writer)
    else:
        write_tokenizer(writer, config, arch, tokenizer_json)
    if arch.startswith("pythia"):
        write_gptneox(writer, model)
        return finish(writer)
    if arch == "gpt2":
        write_gpt2(writer, model)
        return finish(writer)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    for name, tensor in model.state_dict().items():
        values = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", values)
        elif name == "model.norm.weight":
            writer.add_tensor("output_norm.weight", values)
        elif name.endswith("rotary_emb.inv_freq"):
            continue
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                writer.add_tensor("output.weight", values)
        else:
            _, _, layer, rest = name.split(".", 3)
            if arch.startswith("llama") and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
                heads = config.num_attention_heads if "q_proj" in rest else config.num_key_value_heads
                values = llama_cpp_permute(values, heads)
            writer.add_tensor(f"blk.{layer}.{GGUF_NAMES[rest]}", values)
    if arch == "llama31":
        writer.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(config, head_dim))
    finish(writer)


NEOX_GGUF_NAMES = {"input_layernorm": "attn_norm", "attention.query_key_value": "attn_qkv",
                   "attention.dense": "attn_output", "post_attention_layernorm": "ffn_norm",
                   "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}


def write_gptneox(writer, model):
    """As llama.cpp's GPTNeoXModel converter: its keys, and the fused qkv regrouped from
    head by head ([q, k, v] per head) to all q, all k, all v."""
    config = model.config
    heads, width = config.num_attention_heads, config.hidden_size
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(width)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    rotary_pct = config.rope_parameters["partial_rotary_factor"]  # transformers 5's name for Pythia's rotary_pct
    writer.add_rope_dimension_count(int(rotary_pct * (width // heads)))
    writer.add_head_count(heads)
    writer.add_parallel_residual(config.use_parallel_residual)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    top = {"gpt_neox.embed_in.weight": "token_embd.weight", "gpt_neox.final_layer_norm.weight": "output_norm.weight",
           "gpt_neox.final_layer_norm.bias": "output_norm.bias", "embed_out.weight": "output.weight",
           "lm_head.weight": "output.weight"}  # transformers 5 calls embed_out lm_head
    for name, tensor in model.state_dict().items():
        values = tensor.float().numpy()
        if name in top:
            writer.add_tensor(top[name], values)
            continue
        _, _, layer, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        if module not in NEOX_GGUF_NAMES:
            continue  # the rotary buffers
        if module == "attention.query_key_value":
            grouped = values.reshape(heads, 3, width // heads, *values.shape[1:])
            values = np.concatenate([grouped[:, i].reshape(width, *values.shape[1:]) for i in range(3)])
        writer.add_tensor(f"blk.{layer}.{NEOX_GGUF_NAMES[module]}.{kind}", values)


GPT2_GGUF_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                   "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def write_gpt2(writer, model):
    """As llama.cpp's GPT2Model converter: its keys (feed-forward 4 x n_embd), the causal-mask
    buffers left out, the Conv1D weights transposed to linear ones, the tied head not stored."""
    config = model.config
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.n_positions)  # GPT-2's n_ctx, which transformers 5 folds into n_positions
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    top = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
           "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
    for name, tensor in model.state_dict().items():
        values = tensor.float().numpy()
        if name in top:
            writer.add_tensor(top[name], values)
            continue
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        _, _, layer, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        if kind == "weight" and module not in ("ln_1", "ln_2"):
            values = np.ascontiguousarray(values.T)
        writer.add_tensor(f"blk.{layer}.{GPT2_GGUF_NAMES[module]}.{kind}", values)


def write_tokenizer(writer, config, arch, tokenizer_json):
    vocab = tokenizer_json["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tokenizer_json["added_tokens"]}
    types = [3 if t in special else 1 for t in tokens]
    padding = config.vocab_size - len(tokens)  # llama.cpp pads the list to the embedding's rows, as UNUSED
    tokens, types = tokens + [f"[PAD{len(tokens) + i}]" for i in range(padding)], types + [5] * padding
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER[arch])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = tokenizer_json["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_eos_token_id(vocab["<|endoftext|>"])


def finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama", "llama31", "pythia", "pythia_sequential", "gpt2"])
def test_a_gguf_file_matches_the_model_it_was_written_from_and_transformers_reading_it(tmp_path, arch):
    tokenizer_json = byte_level_bpe(tmp_path, PRE_TOKENIZER[arch])
    model = hf_model(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(model, arch, tokenizer_json, path)
    teacher = load_teacher({"_component_": "auto", "path": str(path), "dtype": "fp32",
                            "tokenizer_dir": str(tmp_path / "tok")})
    assert (teacher.depth, teacher.width, teacher.vocab_size) == (2, 48, VOCAB)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens, output_hidden_states=True)
        hidden, logits = forward_with_hidden(teacher.model, tokens, range(3), logits=True)
    for layer in range(3):
        torch.testing.assert_close(hidden[layer], expected.hidden_states[layer], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits, expected.logits, atol=2e-5, rtol=1e-4)
    if arch == "llama31":  # transformers' GGUF reader leaves rope_freqs out; a Hugging Face config cannot state it
        with pytest.raises(ExportError, match="rope_freqs"):
            hf_config(teacher.model.model_args, None, torch.bfloat16)
    elif arch.startswith("pythia"):  # transformers has no GGUF reader for gptneox: the ids against the tokenizer only
        ours = Tokenizer(teacher.tokenizer_path)
        assert ours.hf.encode(TEXT, add_special_tokens=False).ids == \
            tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json)).encode(TEXT).ids
        return
    else:  # transformers reads the file the same way
        from_file = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(logits, from_file.eval()(tokens).logits, atol=2e-5, rtol=1e-4)

    # The embedded tokenizer splits as Qwen2's does: as transformers' converter reads it from the file.
    ours = Tokenizer(teacher.tokenizer_path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert ours.hf.encode(TEXT, add_special_tokens=False).ids == reference.encode(TEXT, add_special_tokens=False)
    assert ours.hf.encode(TEXT, add_special_tokens=False).ids == \
        tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json)).encode(TEXT).ids


@pytest.mark.parametrize("version", ["0.10.0", "0.16.3"])
def test_a_gguf_package_older_than_the_loader_reads_is_one_line(tmp_path, monkeypatch, version):
    """gguf 0.10 and 0.11 under numpy 2 made every file "not a readable GGUF file. Fix: re-download
    or re-convert it"; 0.14 an AttributeError traceback (ReaderField.contents)."""
    import importlib.metadata

    from letrecipes.components.teachers import TeacherError, describe_teacher, load_teacher

    path = tmp_path / "tiny-qwen3.gguf"
    write_gguf(hf_model("qwen3"), "qwen3", byte_level_bpe(tmp_path, PRE_TOKENIZER["qwen3"]), path)
    installed = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == "gguf" else installed(name))
    says = rf"is a GGUF file, whose reader needs gguf 0\.17 or later; {version} is installed\. Fix: pip install"
    for read in (lambda: describe_teacher({"path": str(path)}), lambda: load_teacher({"path": str(path)})):
        with pytest.raises(TeacherError, match=says):
            read()

    def unknown(name):  # gguf-py from a llama.cpp checkout on PYTHONPATH: importable, no installed metadata
        if name == "gguf":
            raise importlib.metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(importlib.metadata, "version", unknown)
    assert describe_teacher({"path": str(path)}).num_layers == 2  # read, not refused for a version it cannot tell


def test_a_gguf_architecture_not_mapped_is_named(tmp_path):
    """(phi3, gemma2 ... are run by transformers: tests/test_transformers_teachers.py.)"""
    import gguf

    from letrecipes.components.teachers import TeacherError

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TeacherError, match=r"GGUF architecture 'rwkv6' is not supported; expected one of llama, qwen2, "
                                           r"qwen3, gptneox, gpt2 or, run by transformers, one of .*phi3.*\. Fix: use "
                                           r"the model's Hugging Face folder"):
        load_teacher({"_component_": "gguf", "path": str(path)})


def test_a_damaged_gguf_file_loads_or_ends_in_one_error(tmp_path):
    """A byte changed in a GGUF file's metadata (a bad copy, a disk's bit rot) ended in a
    traceback: the pre-tokenizer's name no longer UTF-8 (`UnicodeDecodeError` from gguf's
    reader), or merges that name a token the vocabulary lost (tokenizers' bare `Exception:
    Error while initializing BPE`). Each is one error naming the file; and so is every one of
    150 random changes to its first 4,000 bytes, or it loads."""
    import random

    from letrecipes.components.errors import LetRecipesError
    from letrecipes.components.teachers import TeacherError, describe_teacher

    tokenizer_json = byte_level_bpe(tmp_path, PRE_TOKENIZER["llama"])
    path = tmp_path / "tiny.gguf"
    write_gguf(hf_model("llama"), "llama", tokenizer_json, path)
    original = path.read_bytes()
    spec = {"_component_": "auto", "path": str(path), "dtype": "fp32", "tokenizer_dir": str(tmp_path / "tok")}

    name = original.find(b"llama-bpe")  # the value of tokenizer.ggml.pre
    path.write_bytes(original[:name] + b"\x84" + original[name + 1:])
    with pytest.raises(TeacherError, match=r"tiny.gguf: GGUF metadata key 'tokenizer.ggml.pre' does not read "
                                           r"\(UnicodeDecodeError: .*\): the file is damaged. Fix: re-download or "
                                           r"re-convert it."):
        load_teacher(spec)

    rng = random.Random(20261206)
    outcomes = {"loaded": 0, "error": 0}
    for _ in range(150):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(4000)] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            describe_teacher(spec)
            load_teacher(spec)
            outcomes["loaded"] += 1
        except LetRecipesError:
            outcomes["error"] += 1
    assert outcomes["loaded"] > 3 and outcomes["error"] > 100, outcomes  # 7 and 143 with this seed


def with_metadata(source, path, key, value=None, kind=None, recode=None):
    """A copy of the GGUF file ``source`` at ``path`` with metadata ``key`` written as ``value``
    of GGUF type ``kind`` (a GGUFValueType; an ARRAY's items as ints or strings; added last if
    the file lacks it), or left out when ``kind`` is None. The tensors are copied as they are,
    or as ``recode(values)`` makes them, (data, its GGMLQuantizationType), where it returns one."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(path), reader.fields["general.architecture"].contents())
    writer.kv_data[0].pop("general.architecture", None)  # written again below, maybe changed
    sub = None if kind != gguf.GGUFValueType.ARRAY else \
        gguf.GGUFValueType.STRING if value and isinstance(value[0], str) else gguf.GGUFValueType.INT32
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if name == key:
            if kind is not None:
                writer.add_key_value(name, value, kind, sub_type=sub)
            continue
        field_sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=field_sub)
    if key not in reader.fields and kind is not None:
        writer.add_key_value(key, value, kind, sub_type=sub)
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))
        recoded = recode(np.array(tensor.data).reshape(shape)) if recode and tensor.tensor_type.name == "F32" else None
        if recoded is not None:
            writer.add_tensor(tensor.name, recoded[0], raw_dtype=recoded[1])
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type, raw_shape=shape)
    finish(writer)


def iq4_nl(values):
    """IQ4_NL blocks of a float32 matrix whose rows are a multiple of 32 long, written here from
    llama.cpp's layout (an fp16 scale, then 16 bytes: element i in the low nibble of byte i,
    element 16 + i in its high one, each an index into the format's 16 levels), and the values
    those blocks decode to."""
    levels = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)
    blocks = values.reshape(-1, 32)
    scale = (np.abs(blocks).max(axis=1, keepdims=True) / 127).astype(np.float16)
    step = scale.astype(np.float32)
    index = np.abs(blocks[:, :, None] / np.where(step == 0, 1, step)[:, :, None] - levels).argmin(-1).astype(np.uint8)
    raw = np.concatenate([scale.view(np.uint8), index[:, :16] | (index[:, 16:] << 4)], axis=1)
    return raw.reshape(values.shape[0], -1), (step * levels[index]).reshape(values.shape)


def test_a_gguf_file_of_i_quants_reads_as_the_values_its_blocks_encode(tmp_path):
    """The "i-quants" (IQ4_NL, IQ4_XS, IQ3_M, ... : many releases' smaller files) were "is
    quantized as IQ4_NL, which this loader does not read"; every type the installed gguf
    package dequantizes is read now. A file of IQ4_NL blocks written here gives the same
    model as a float32 file of the values those blocks encode, decoded here by hand."""
    import gguf

    tokenizer_json = byte_level_bpe(tmp_path, PRE_TOKENIZER["llama"])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))
    write_gguf(model, "llama", tokenizer_json, tmp_path / "f32.gguf")
    quantized = []

    def blocks(values):
        if values.ndim == 2 and values.shape[1] % 32 == 0:
            quantized.append(values.shape)
            return iq4_nl(values)[0], gguf.GGMLQuantizationType.IQ4_NL

    with_metadata(tmp_path / "f32.gguf", tmp_path / "iq4_nl.gguf", None, recode=blocks)
    with_metadata(tmp_path / "f32.gguf", tmp_path / "decoded.gguf", None, recode=lambda values: (
        iq4_nl(values)[1], gguf.GGMLQuantizationType.F32) if values.ndim == 2 and values.shape[1] % 32 == 0 else None)
    assert len(quantized) == 16  # 7 matrices a block, the embeddings and the output head
    teachers = [load_teacher({"_component_": "gguf", "path": str(tmp_path / name), "dtype": "fp32",
                              "tokenizer_dir": str(tmp_path / "tok")}) for name in ("iq4_nl.gguf", "decoded.gguf")]
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = [forward_with_hidden(teacher.model, tokens, [2], logits=True)[1] for teacher in teachers]
        exact = model(tokens).logits
    torch.testing.assert_close(logits[0], logits[1])
    assert not torch.allclose(logits[0], exact, atol=1e-3)  # 4-bit values: the blocks were read, not the source


def test_a_gguf_metadata_value_of_the_wrong_kind_names_the_key(tmp_path):
    """A metadata value that still reads but is of the wrong kind (an edit, another tool's
    file): a block_count of 'x' or a per-block list of head counts was a TypeError or
    ValueError from int(), a feed_forward_length of -0.5 was read as 0 and refused as the
    student's `model.intermediate_dim`, a deleted head_count_kv a numpy reshape error from
    undoing llama.cpp's q/k permutation, and a tokenizer model that is a list went
    unnoticed when the tokenizer was in the cache. Each is now one line naming the key."""
    import gguf

    from letrecipes.components.teachers import TeacherError

    VT = gguf.GGUFValueType
    base = tmp_path / "base.gguf"
    write_gguf(hf_model("llama"), "llama", byte_level_bpe(tmp_path, PRE_TOKENIZER["llama"]), base)
    spec = {"_component_": "auto", "path": str(tmp_path / "x.gguf"), "dtype": "fp32",
            "tokenizer_dir": str(tmp_path / "tok")}
    load_teacher({**spec, "path": str(base)})  # its tokenizer is in the cache now
    refit = r"Fix: re-download the file, or convert the model again with llama.cpp's convert_hf_to_gguf.py\.$"
    cases = [
        ("llama.block_count", "x", VT.STRING, r"'llama.block_count' is 'x', where an integer from 1 to 2,147,483,647 "
                                              r"is expected: the file was damaged or edited, or written by another "
                                              r"tool\. " + refit),
        ("llama.feed_forward_length", -0.5, VT.FLOAT32, r"'llama.feed_forward_length' is -0.5, where an integer"),
        ("llama.embedding_length", 1e30, VT.FLOAT32, r"'llama.embedding_length' is 1.0000000150474662e\+30, where an"),
        ("llama.rope.freq_base", 0, VT.UINT32, r"'llama.rope.freq_base' is 0, where a finite number > 0 is expected"),
        ("llama.attention.head_count", [6, 6], VT.ARRAY, r"'llama.attention.head_count' gives one value per block; "
                                                         r"this loader reads models whose blocks are all alike"),
        ("llama.attention.head_count", 5, VT.UINT32, r"'llama.attention.head_count' is 5, where a multiple of "
                                                     r"attention.head_count_kv=2 is expected"),
        ("llama.attention.head_count_kv", None, None, r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape "
                                                      r"\(16, 48\), but .*x.gguf implies \(48, 48\) for .*Fix: its "
                                                      r"metadata and its tensors disagree: re-download the file"),
        ("llama.attention.key_length", 4, VT.UINT32, r"'llama.rope.dimension_count' is 8, but its heads have 4 "
                                                     r"features .*: a llama model turns all of them\. " + refit),
        ("tokenizer.ggml.model", [1, 2], VT.ARRAY, r"'tokenizer.ggml.model' is a list of 2 values, where a name"),
        ("tokenizer.ggml.merges", True, VT.BOOL, r"'tokenizer.ggml.merges' is True, where a list of strings"),
        ("tokenizer.ggml.token_type", [1, 1], VT.ARRAY, r"'tokenizer.ggml.token_type' is a list of 2 values, where "
                                                        rf"a list of {VOCAB} integers, one per token is expected"),
        # sizes no memory holds, compared before the model is built (a billion blocks was std::bad_alloc, a
        # billion positions a 32 GB RoPE table; smaller here, so that a lost check cannot take the machine)
        ("llama.block_count", 4096, VT.UINT32, r"4,096 blocks \(block_count\), but the file's tensors hold 2\. "
                                               + refit),
        ("llama.context_length", 2**24 + 1, VT.UINT32, r"16,777,217 positions \(context_length\) is past the "
                                                       r"16,777,216 a teacher is built for\. " + refit),
    ]
    for key, value, kind, message in cases:
        with_metadata(base, tmp_path / "x.gguf", key, value, kind)
        with pytest.raises(TeacherError, match=message):
            load_teacher(spec)


@pytest.mark.parametrize("arch", ["qwen3", "pythia", "gpt2"])
def test_a_gguf_file_with_a_metadata_value_changed_at_random_loads_or_ends_in_one_error(tmp_path, arch):
    """Each metadata key of the file given another value (of another kind, scaled, or left
    out), 60 times per architecture: the file loads and runs, or it is one error."""
    import random

    import gguf

    from letrecipes.components.errors import LetRecipesError

    VT = gguf.GGUFValueType
    base = tmp_path / "base.gguf"
    write_gguf(hf_model(arch), arch, byte_level_bpe(tmp_path, PRE_TOKENIZER[arch]), base)
    fields = {name: field for name, field in gguf.GGUFReader(str(base)).fields.items()
              if not name.startswith("GGUF.") and name != "general.architecture"}
    spec = {"_component_": "auto", "path": str(tmp_path / "x.gguf"), "dtype": "fp32",
            "tokenizer_dir": str(tmp_path / "tok")}
    rng = random.Random(f"{arch}-20261206")
    outcomes = {"loaded": 0, "error": 0}
    for _ in range(60):
        key = rng.choice(sorted(fields))
        old = fields[key].contents()
        value, kind = rng.choice([(None, None), ("x", VT.STRING), (-1, VT.INT32), (0, VT.UINT32), (2**40, VT.UINT64),
                                  (float("nan"), VT.FLOAT32), (-0.5, VT.FLOAT32), (True, VT.BOOL), ([1, 2], VT.ARRAY),
                                  (["a"], VT.ARRAY)])
        if isinstance(old, (int, float)) and not isinstance(old, bool) and rng.random() < 0.4:
            value, kind = type(old)(old * rng.choice([0.5, 2, 1000])), fields[key].types[0]  # scaled, same kind
        with_metadata(base, tmp_path / "x.gguf", key, value, kind)
        try:
            teacher = load_teacher(spec)
            with torch.no_grad():
                forward_with_hidden(teacher.model, torch.randint(0, teacher.vocab_size, (1, 8)), [1], logits=True)
            Tokenizer(teacher.tokenizer_path).hf.encode(TEXT)
            outcomes["loaded"] += 1
        except LetRecipesError:
            outcomes["error"] += 1
    assert outcomes["loaded"] >= 5 and outcomes["error"] >= 20, outcomes


def test_a_gguf_model_split_in_parts_loads_from_any_part_as_the_whole_file(tmp_path):
    """llama.cpp's gguf-split cuts a model into <name>-00001-of-0000N.gguf, ...: the first part
    has the metadata, each part some tensors. Read as one file was "the weights lack 12
    tensor(s) ... re-download the file" (the first part's tensors alone). Every part is read,
    whichever is named; a part missing, renamed or of another model is one line."""
    import shutil

    from letrecipes.components.teachers import TeacherError, content_fingerprint

    tokenizer_json, model = byte_level_bpe(tmp_path, PRE_TOKENIZER["llama"]), hf_model("llama")
    write_gguf(model, "llama", tokenizer_json, tmp_path / "whole.gguf")
    (tmp_path / "split").mkdir()
    write_gguf(model, "llama", tokenizer_json, tmp_path / "split" / "tiny.gguf", split_max_tensors=8)
    parts = sorted((tmp_path / "split").iterdir())
    assert [p.name for p in parts] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))

    def logits(path):
        teacher = load_teacher({"_component_": "auto", "path": str(path), "dtype": "fp32",
                                "tokenizer_dir": str(tmp_path / "tok")})
        with torch.no_grad():
            return forward_with_hidden(teacher.model, tokens, [], logits=True)[1]

    whole = logits(tmp_path / "whole.gguf")
    for part in (parts[0], parts[2]):
        torch.testing.assert_close(logits(part), whole, rtol=0, atol=0)
    before = content_fingerprint(parts[0])  # a resume's check of the teacher covers every part
    data = bytearray(parts[2].read_bytes())
    data[-1] ^= 1
    parts[2].write_bytes(bytes(data))
    assert content_fingerprint(parts[0]) != before

    parts[1].rename(tmp_path / "aside.gguf")
    with pytest.raises(TeacherError, match=r"tiny-00001-of-00003.gguf is one part of a GGUF model split in 3 files, "
                                           r"and tiny-00002-of-00003.gguf is not beside it in .*Fix: download every "
                                           r"part into that folder \(or merge them into one: llama-gguf-split --merge"):
        logits(parts[0])
    (tmp_path / "aside.gguf").rename(parts[1])
    renamed = tmp_path / "split" / "tiny_part1.gguf"
    shutil.copy(parts[0], renamed)
    with pytest.raises(TeacherError, match=r"tiny_part1.gguf is one part of a GGUF model split in 3 files, but its "
                                           r"name is not the one llama.cpp's gguf-split gives"):
        logits(renamed)
    shutil.copy(parts[0], parts[1])  # the first part where the second should be
    with pytest.raises(TeacherError, match=r"tiny-00002-of-00003.gguf is not part 2 of the 3 that "
                                           r"tiny-00001-of-00003.gguf belongs to"):
        logits(parts[0])


def test_a_gguf_with_a_sentencepiece_vocabulary_gets_the_tokenizer_transformers_reads_from_it(tmp_path, monkeypatch):
    """Llama 2, TinyLlama and Mistral GGUF files carry llama.cpp's `llama` vocabulary
    (SentencePiece: pieces with scores, byte fallback, no merges). It was refused ("embedded
    tokenizer type 'llama' is not supported"); it is now converted with transformers' GGUF
    reader, and the teacher's tokenizer.json encodes as transformers does, unknown characters
    as bytes."""
    path = tmp_path / "spm.gguf"
    model = hf_model("llama")
    pieces = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], "\u2581", *"abcdefghijklmnopqrstuvwxyz",
              "\u2581t", "\u2581th", "\u2581the", "\u2581r", "\u2581ri", "\u2581riv", "\u2581rive", "\u2581river", "\u2581a",
              "\u2581an", "\u2581and", "in", "ing", "er", "on"]
    types = [2, 3, 3, *[6] * 256, *[1] * (len(pieces) - 259)]
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *[-float(i) for i in range(len(pieces) - 259)]]
    padding = VOCAB - len(pieces)

    def sentencepiece_vocabulary(writer):
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces + [f"[PAD{i}]" for i in range(padding)])
        writer.add_token_scores(scores + [-1e4] * padding)
        writer.add_token_types(types + [5] * padding)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)

    write_gguf(model, "llama", None, path, write_vocabulary=sentencepiece_vocabulary)
    from letrecipes.components.teachers import TeacherError

    with monkeypatch.context() as without:  # transformers is optional (the eval extra)
        without.setitem(sys.modules, "transformers", None)
        with pytest.raises(TeacherError, match=r"spm.gguf: its embedded tokenizer is of llama.cpp's type 'llama' "
                                               r"\(not byte-level BPE\), which letrecipes converts with transformers, "
                                               r"not installed here. Fix: pip install transformers"):
            load_teacher({"path": str(path), "tokenizer_dir": str(tmp_path / "none")})
    teacher = load_teacher({"_component_": "auto", "path": str(path), "dtype": "fp32",
                            "tokenizer_dir": str(tmp_path / "tok")})
    ours = Tokenizer(teacher.tokenizer_path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ("the river and the rain", "The River: 42 times, naïve 🙂", "  two spaces\nand a line"):
        ids = ours.hf.encode(text, add_special_tokens=False).ids
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.hf.decode(ids) == reference.decode(ids)  # SentencePiece drops one leading space
        assert ours.hf.decode(ids) == (text[1:] if text.startswith(" ") else text)
    assert ours.hf.encode("the river", add_special_tokens=False).tokens == ["\u2581the", "\u2581river"]
    assert ours.eos_token == "</s>" and max(ours.hf.encode("🙂 ÿ", add_special_tokens=False).ids) < teacher.vocab_size


def test_the_metadata_is_parsed_once_per_file_and_again_for_a_file_rewritten_in_place(tmp_path, monkeypatch):
    """gguf's reader parses the whole vocabulary (2.5 s for SmolLM2's): the recipe's four
    requests (shape, tokenizer, check, weights) parsed it four times; now once. A file
    rewritten at its path, at the same size within the same file-time tick, is parsed again."""
    import gguf

    from letrecipes.components import gguf_teacher
    from letrecipes.components.teachers import describe_teacher, teacher_format, tokenizer_file

    tokenizer_json = byte_level_bpe(tmp_path, PRE_TOKENIZER["qwen2"])
    source = tmp_path / "source.gguf"
    write_gguf(hf_model("qwen2"), "qwen2", tokenizer_json, source)
    longer = tmp_path / "longer.gguf"  # the same file but for its context: the same size
    with_metadata(source, longer, "qwen2.context_length", 128, gguf.GGUFValueType.UINT32)
    assert longer.stat().st_size == source.stat().st_size
    parses = []
    reader_init = gguf.GGUFReader.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__",
                        lambda self, *a, **k: parses.append(a) or reader_init(self, *a, **k))
    path = tmp_path / "teacher.gguf"
    path.write_bytes(source.read_bytes())
    section = {"path": str(path), "tokenizer_dir": str(tmp_path / "tok"), "dtype": "fp32"}
    gguf_teacher.forget_readers()
    assert describe_teacher(section).max_seq_len == 64
    tokenizer_file(path, key="teacher.path", fmt=teacher_format(section))
    describe_teacher(section, check_weights=True)
    teacher = load_teacher(section)
    assert len(parses) == 1 and teacher.context == 64
    with open(path, "r+b") as f:  # in place: the same inode and size
        f.write(longer.read_bytes())
    assert describe_teacher(section).max_seq_len == 128 and len(parses) == 2


def test_a_gguf_teacher_reads_a_bos_first_where_llama_cpp_would_put_one(tmp_path):
    """tokenizer.ggml.add_bos_token, or where a file does not say, llama.cpp's default for its
    vocabulary (Llama 3's `llama-bpe` puts one; Qwen2's split does not)."""
    import gguf

    from letrecipes.components.teachers import teacher_bos

    tokenizer_json = byte_level_bpe(tmp_path, PRE_TOKENIZER["qwen2"])
    eos = tokenizer_json["model"]["vocab"]["<|endoftext|>"]
    plain, model = tmp_path / "plain.gguf", hf_model("qwen2")
    write_gguf(model, "qwen2", tokenizer_json, plain)
    with_id = tmp_path / "with_id.gguf"
    with_metadata(plain, with_id, "tokenizer.ggml.bos_token_id", eos, gguf.GGUFValueType.UINT32)
    says_so = tmp_path / "says_so.gguf"
    with_metadata(with_id, says_so, "tokenizer.ggml.add_bos_token", True, gguf.GGUFValueType.BOOL)
    llama3 = tmp_path / "llama3.gguf"
    with_metadata(with_id, llama3, "tokenizer.ggml.pre", "llama-bpe", gguf.GGUFValueType.STRING)
    assert [teacher_bos({"path": str(p)}) for p in (plain, with_id, says_so, llama3)] == \
        [None, None, (eos, "<|endoftext|>"), (eos, "<|endoftext|>")]
    teacher = load_teacher({"path": str(says_so), "dtype": "fp32", "tokenizer_dir": str(tmp_path / "tok")})
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(torch.cat([torch.tensor([[eos]]), tokens], dim=1)).logits[:, 1:]
    torch.testing.assert_close(teacher.logits(tokens), expected, atol=2e-5, rtol=1e-4)

    # the export of a Llama 3 style file (llama-bpe: a BOS by llama.cpp's default) puts the BOS before a text as
    # the file says to, where the tokenizer built from it has no such rule: transformers and
    # teacher.prepend_bos read the folder as the model was trained
    from letrecipes.components.export import export_any

    llama_json = byte_level_bpe(tmp_path, PRE_TOKENIZER["llama"])
    write_gguf(hf_model("llama"), "llama", llama_json, tmp_path / "llama.gguf")
    with_metadata(tmp_path / "llama.gguf", tmp_path / "llama3.gguf", "tokenizer.ggml.bos_token_id",
                  llama_json["model"]["vocab"]["<|endoftext|>"], gguf.GGUFValueType.UINT32)
    export_any(tmp_path / "llama3.gguf", tmp_path / "exported", dtype=torch.float32)
    bos = llama_json["model"]["vocab"]["<|endoftext|>"]
    assert teacher_bos({"path": str(tmp_path / "llama3.gguf")}) == teacher_bos({"path": str(tmp_path / "exported")}) \
        == (bos, "<|endoftext|>")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")("the fox").input_ids[0] == bos
