"""tokenizer.source: teacher, vocabulary padding, and LET with a Hugging Face teacher folder."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from letrecipes.components.tokenizer import train_bpe
from letrecipes.components.metrics import read_metrics
from letrecipes import let_pretrain, pretrain

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def hf_teacher_dir(tokenizer_path, tmp_path_factory):
    """A tiny random Llama in the Hugging Face on-disk format, with the tests' tokenizer."""
    import torch

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))
    out = tmp_path_factory.mktemp("hf_teacher")
    model.save_pretrained(out)
    shutil.copy(tokenizer_path, out / "tokenizer.json")
    return out


def test_let_with_a_huggingface_teacher_and_its_tokenizer(base_overrides, hf_teacher_dir, tmp_path):
    overrides = [o for o in base_overrides if not o.startswith("tokenizer.path=")]
    let_pretrain.recipe_main(["--config", "let_tiny", *overrides, f"output_dir={tmp_path}", "max_steps=4",
                              "tokenizer.source=teacher", "teacher._component_=auto", f"teacher.path={hf_teacher_dir}",
                              "teacher.dtype=fp32", "alignment.schedule.stop=3"])
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["lambda"] > 0 for r in records] == [True, True, True, False]
    assert all(-1 <= r["align_loss"] <= 1 for r in records[:3])
    final = tmp_path / "final"
    assert (final / "tokenizer.json").read_bytes() == (hf_teacher_dir / "tokenizer.json").read_bytes()
    assert json.loads((final / "config.json").read_text(encoding="utf-8"))["vocab_size"] == 512


def test_student_vocabulary_is_padded_and_the_cache_follows_the_tokenizer(base_overrides, corpus_dir, tmp_path):
    odd = train_bpe([p.read_text(encoding="utf-8") for p in corpus_dir.glob("*.txt")], 500, tmp_path / "odd.json")
    cache = tmp_path / "cache"
    common = [*base_overrides, "max_steps=1", f"data.cache_dir={cache}"]
    pretrain.recipe_main(["--config", "pretrain_tiny", *common, f"output_dir={tmp_path / 'a'}"])
    pretrain.recipe_main(["--config", "pretrain_tiny", *common, f"output_dir={tmp_path / 'b'}", f"tokenizer.path={odd}"])
    assert len(list(cache.glob("prepared-*"))) == 2  # another tokenizer, another cache entry
    config = json.loads((tmp_path / "b" / "final" / "config.json").read_text(encoding="utf-8"))
    assert config["vocab_size"] == 512  # 500 tokens -> a multiple of 64
    embeddings = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))["model.embed_tokens.weight"]
    assert embeddings.shape[0] == 512


def test_tokenizer_path_may_name_the_model_folder(base_overrides, hf_teacher_dir, tmp_path):
    overrides = [o for o in base_overrides if not o.startswith("tokenizer.path=")]
    pretrain.recipe_main(["--config", "pretrain_tiny", *overrides, f"output_dir={tmp_path}", "max_steps=1",
                          f"tokenizer.path={hf_teacher_dir}"])
    assert (tmp_path / "final" / "tokenizer.json").read_bytes() == (hf_teacher_dir / "tokenizer.json").read_bytes()


def test_source_teacher_without_a_teacher_path_is_refused(base_overrides, tmp_path):
    with pytest.raises(SystemExit, match="tokenizer.source=teacher but there is no teacher.path"):
        pretrain.recipe_main(["--config", "pretrain_tiny", *base_overrides, f"output_dir={tmp_path}",
                              "tokenizer.source=teacher"])


def test_a_folder_with_a_sentencepiece_model_only_names_the_conversion_that_works(corpus_dir, tmp_path):
    """Llama 2 / Mistral style folders may ship tokenizer.model alone: the error gives the
    one command that writes the tokenizer.json, and after it the folder loads."""
    import shlex
    import subprocess
    import sys

    import sentencepiece

    from letrecipes.components.errors import LetRecipesError
    from letrecipes.components.tokenizer import load_tokenizer

    folder = tmp_path / "llama2_style"
    folder.mkdir()
    sentencepiece.SentencePieceTrainer.train(input=",".join(map(str, sorted(corpus_dir.glob("*.txt"))[:2])),
                                             model_prefix=str(folder / "tokenizer"), vocab_size=300, model_type="bpe",
                                             minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "eos_token": "</s>"}))
    with pytest.raises(LetRecipesError, match="has tokenizer.model but no tokenizer.json") as caught:
        load_tokenizer({"path": str(folder)})
    command = str(caught.value).split("Fix: write one beside it with transformers (once): ")[1]
    subprocess.run([sys.executable if part == "python" else part for part in shlex.split(command)], check=True,
                   timeout=300)
    tokenizer = load_tokenizer({"path": str(folder)})
    assert tokenizer.eos_token == "</s>" and tokenizer.vocab_size == 300


def test_metas_original_folder_points_to_the_hugging_face_files_above_it(hf_teacher_dir, tmp_path):
    """torchtune's Llama configs name ``original/tokenizer.model`` (tiktoken ranks) and Meta's
    ``original/`` checkpoint: each is refused with the Hugging Face file of the same download."""
    from letrecipes.components.errors import LetRecipesError
    from letrecipes.components.teachers import load_teacher
    from letrecipes.components.tokenizer import load_tokenizer

    download = tmp_path / "Llama-3.2-1B"
    shutil.copytree(hf_teacher_dir, download)
    original = download / "original"
    original.mkdir()
    (original / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")
    (original / "params.json").write_text(json.dumps({"dim": 48, "n_layers": 3}))
    (original / "consolidated.00.pth").write_bytes(b"PK")
    above = download / "tokenizer.json"
    for named in (original / "tokenizer.model", original):
        with pytest.raises(LetRecipesError, match=f"Fix: tokenizer.path={above} ") as caught:
            load_tokenizer({"path": str(named)})
    assert "tiktoken" in str(caught.value) or "tokenizer.model" in str(caught.value)
    for named in (original, original / "consolidated.00.pth"):
        with pytest.raises(LetRecipesError, match=f"Meta's original checkpoint .* Fix: teacher.path={download} "):
            load_teacher({"path": str(named)})
    # a PEFT adapter (a fine-tune's LoRA deltas saved alone): "no teacher format recognises" it
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "meta-llama/Llama-3.2-1B",
                                                              "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"{}")
    for named in (adapter, adapter / "adapter_model.safetensors"):
        with pytest.raises(LetRecipesError, match=r"is a PEFT adapter of meta-llama/Llama-3.2-1B \(adapter_config.json"
                                                  r"\): low-rank changes to a model, not a model. Fix: merge it into"):
            load_teacher({"path": str(named)})
    # a SentencePiece model with no tokenizer.json anywhere near: what it is, and the conversion
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "tokenizer.model").write_bytes(b"\n\x0f\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    with pytest.raises(LetRecipesError, match="is a SentencePiece model, not a tokenizer.json.*save_pretrained"):
        load_tokenizer({"path": str(alone / "tokenizer.model")})
    (alone / "vocab.json").write_text('{"a": 0}')  # GPT-2's older pair: its own words, not a JSON error
    with pytest.raises(LetRecipesError, match=r"is a GPT-2 style BPE vocab.json \(half of a vocab.json \+ merges.txt "
                                              r"pair\), not a tokenizer.json.*save_pretrained"):
        load_tokenizer({"path": str(alone / "vocab.json")})
    assert load_tokenizer({"path": str(above)}).vocab_size > 0
